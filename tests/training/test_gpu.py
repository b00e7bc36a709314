"""Tests that need a CUDA GPU (``pytest -m gpu``; skipped without one; ``unmix bench gpu`` runs them).

DeepSpeed picks its accelerator once per process and conftest pins it to the CPU for the CPU tests, so
the bf16 training step runs as ``unmix train`` in a subprocess with ``DS_ACCELERATOR=cuda``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_bf16_training_keeps_target_queue_and_weights_fp32(tmp_path: Path):
    """``unmix train`` on the GPU at bf16 (synthetic data, Un-Mix on): the loss stays finite (exit 0)
    and the checkpoint holds an fp32 key encoder, an fp32 queue and fp32 online weights."""
    config = tmp_path / "gpu.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    overrides = [
        "method.name=moco_v2",
        "unmix.enabled=true",
        "data.source=synthetic",
        "data.device=gpu",
        "data.crop=32",
        "data.synthetic_samples=128",
        "model.arch=resnet10",
        "model.width=16",
        "optim.batch_size=32",
        "optim.epochs=1",
        "deepspeed.precision=bf16",
        "method.moco.K=256",
        "method.moco.dim=16",
        "method.moco.hidden_dim=32",
        "mlflow.enabled=false",
        "log.every_steps=1",
        "log.progress=lines",
        f"output_dir={out}",
    ]
    env = {**os.environ, "DS_ACCELERATOR": "cuda"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "unmix", "train", str(config), *overrides],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    state = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    target = state["method"]["target"]
    assert all(v.dtype == torch.float32 for k, v in target.items() if v.is_floating_point()), target.keys()
    assert state["method"]["queue"]["queue"].dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in state["module"].values() if v.is_floating_point())
    assert (out / "backbone.pt").is_file()


def _nccl_group(tmp_path: Path):
    """A one-process NCCL group: the default group when none exists, else a new NCCL subgroup."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        store = tdist.FileStore(str(tmp_path / "store"), 1)
        tdist.init_process_group("nccl", store=store, rank=0, world_size=1)
        return tdist.group.WORLD, True
    return tdist.new_group(ranks=[0], backend="nccl"), False


def test_nccl_one_process_gather_of_channels_last_images(tmp_path: Path):
    import torch.distributed as tdist
    from torch import nn

    from unmix.training import dist
    from unmix.training.heads import Network
    from unmix.training.moco import gather_images, shuffled_embed

    torch.cuda.set_device(0)
    group, owned = _nccl_group(tmp_path)
    try:
        x = torch.randn(8, 3, 16, 16, device="cuda").contiguous(memory_format=torch.channels_last)
        gathered = dist.gather_rows(x, group)
        assert gathered.is_contiguous() and torch.equal(gathered, x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gather_images(x, group)
            net = Network(
                nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(4, 4)
            )
            net = net.cuda().to(memory_format=torch.channels_last)
            k = shuffled_embed(net, x, torch.Generator().manual_seed(0), group=group)
            k_local = net.embed(x)
        assert low.dtype == torch.bfloat16 and torch.equal(low, x.to(torch.bfloat16))
        assert torch.allclose(k.float(), k_local.float(), atol=2e-2, rtol=2e-2)
    finally:
        if owned:
            tdist.destroy_process_group()


def test_device_picking_on_a_real_device(monkeypatch):
    from unmix.pipeline.devices import local_cuda_device, local_cuda_index

    n = torch.cuda.device_count()
    assert local_cuda_index(n) == 0  # a local rank beyond the visible devices wraps around
    monkeypatch.setenv("LOCAL_RANK", str(n))  # e.g. srun --gpus-per-task=1, task n of the node
    device = local_cuda_device()
    assert device == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    torch.ones(1, device=device)  # the device opens (no "invalid device ordinal")


def test_synthetic_source_on_the_device_mixes_exactly():
    from unmix.training.bench_gpu import mixture_mode
    from unmix.training.synthetic import SyntheticLoader

    def make():
        return SyntheticLoader(16, 64, samples=16 * 30, unmix=True, device="cuda", channels_last=True, seed=3)

    a, b = list(make()), list(make())
    modes = {mixture_mode(x["view1"], x["mixed"], x["lam"]) for x in a}
    assert modes == {"mixup", "cutmix"}
    assert all(x["view1"].is_cuda and x["lam"].is_cuda for x in a)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
