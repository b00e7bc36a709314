"""``unmix bench gpu``: the CPU-side self-checks (--dry-run) run in CI; without CUDA a one-line error;
the mixing check it applies to loader output rejects wrong mixtures."""

from __future__ import annotations

import json

import pytest
import torch

from unmix.cli import main
from unmix.pipeline.augment import RECIPES
from unmix.training import bench_gpu
from unmix.training.bench_gpu import CheckError, mixture_mode


def test_dry_run_builds_everything_that_needs_no_gpu(tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--dry-run", "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    status = {c["name"]: c["status"] for c in d["checks"]}
    assert d["passed"] and d["dry_run"]
    for name in ("configs", "models (meta)", "synthetic source (cpu)", "deepspeed config zero-1/zero-2"):
        assert status[name] == "pass", d
    assert status["gpu graph definitions"] == "pass", d  # DALI is installed in CI
    graphs = next(c for c in d["checks"] if c["name"] == "gpu graph definitions")["values"]
    n_recipes = len(RECIPES)  # moco_v2, moco_v1, byol, moco_cifar
    assert graphs["graphs"] == 2 * (n_recipes * 4 + 2)  # layouts x (recipes x Un-Mix variants + eval splits)
    models = next(c for c in d["checks"] if c["name"] == "models (meta)")["values"]
    assert 27e6 < models["moco_v2"]["online_params"] < 29e6  # ResNet-50 + 2048-2048-128 head
    # the multi-rank launcher: 2 CPU ranks on gloo, every node check's code path
    for name in (
        "node launcher",
        "node shuffle-bn",
        "node moco key gather + enqueue",
        "node zero-1 steps",
        "node zero-2 steps",
        "node checkpoint write + resume",
        "node throughput moco_v2 + unmix",
        "node throughput byol + unmix",
    ):
        assert status[name] == "pass", (name, d)
    assert status["node syncbn"] == "skip"  # no CPU kernel in torch
    tput = next(c for c in d["checks"] if c["name"] == "node throughput moco_v2 + unmix")["values"]
    assert len(tput["per_rank"]) == 2 and tput["images_per_s_per_gpu_min"] > 0
    assert 0 <= tput["data_wait_fraction_max"] < 1 and "peak_gib_max" in tput
    out = capsys.readouterr().out
    assert "all checks passed" in out
    first = out.splitlines()[0]  # torch's CUDA, the driver and the DALI wheel (its CUDA flavour) first
    assert first.startswith("unmix bench gpu: torch ") and "(CUDA " in first and "driver " in first
    assert "nvidia-dali-cuda1" in first and d["environment"]["dali_wheel"] in first


def test_a_failing_check_fails_the_command(tmp_path, monkeypatch):
    def broken():
        raise CheckError("measured something wrong")

    monkeypatch.setattr(bench_gpu, "check_configs", broken)
    out = tmp_path / "gpu.json"
    assert main(["bench", "gpu", "--dry-run", "--nproc", "1", "--json", str(out)]) == 1
    d = json.loads(out.read_text())
    (c,) = [c for c in d["checks"] if c["name"] == "configs"]
    assert c["status"] == "fail" and "measured something wrong" in c["detail"]
    assert not d["passed"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_without_cuda_a_one_line_error(capsys):
    assert main(["bench", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA device" in err and "--dry-run" in err


def test_mixing_check_rejects_wrong_mixtures():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32, generator=g)
    lam = torch.full((4,), 0.25)
    assert mixture_mode(x, 0.25 * x + 0.75 * x.flip(0), lam) == "mixup"
    with pytest.raises(CheckError, match="neither"):
        mixture_mode(x, 0.3 * x + 0.7 * x.flip(0), lam)  # lam does not match the mixture
    cut = x.clone()
    cut[:, :, 8:24, 8:24] = x.flip(0)[:, :, 8:24, 8:24]
    assert mixture_mode(x, cut, torch.full((4,), 0.75)) == "cutmix"
    with pytest.raises(CheckError, match="does not match the pasted area"):
        mixture_mode(x, cut, torch.full((4,), 0.5))
    two = cut.clone()
    two[:, :, 8:24, 12] = x[:, :, 8:24, 12]  # a hole in the box: not one rectangle
    with pytest.raises(CheckError, match="unpasted pixel inside"):
        mixture_mode(x, two, torch.full((4,), 0.75))
    with pytest.raises(CheckError, match="one lam per batch"):
        mixture_mode(x, cut, torch.tensor([0.75, 0.75, 0.7, 0.75]))
    with pytest.raises(CheckError, match="neither"):
        mixture_mode(x, x.flip(0)[[1, 0, 2, 3]], lam)  # a wrong partner


def test_cuda_checks_run_their_course_on_a_small_cpu_model(monkeypatch):
    """The training-step and ZeRO checks, with the model shrunk and the device switched to the CPU:
    their code path (setup, steps, fp32 and EMA checks, figures) runs in CI, not only on a GPU node."""
    for name in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 0)
    r50 = bench_gpu.r50_overrides

    def small(*args, **kwargs):
        keep = [
            o for o in r50(*args, **kwargs) if not o.startswith(("model.", "data.device", "deepspeed.prec"))
        ]
        return keep + [
            "model.arch=resnet10",
            "model.width=16",
            "data.device=cpu",
            "data.crop=32",
            "deepspeed.precision=fp32",
            "method.moco.K=256",
            "method.moco.dim=16",
            "method.moco.hidden_dim=32",
        ]

    monkeypatch.setattr(bench_gpu, "r50_overrides", small)
    # The checks start a one-process group in this process: keep its rendezvous out of os.environ (later
    # tests' subprocesses inherit it) and tear the group down afterwards.
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    try:
        figure, values = bench_gpu.check_train("moco_v2", True, 8, 1, 2)
        assert values["images_per_s"] > 0 and "img/s" in figure
        figure, _ = bench_gpu.check_zero(2, 8)
        assert "fp32" in figure
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs ranks that die for want of a GPU")
def test_node_launcher_reports_a_rank_that_fails(tmp_path):
    """A rank that dies is a failed row naming the rank and its last output, not a hang or a pass."""
    from unmix.training import bench_node

    # dry_run None: the ranks ask for NCCL, and with no GPU visible they die before any check
    rows, error = bench_node.launch({"dry_run": None}, 2, timeout_s=300)
    assert rows == [] and error.startswith("rank 0 exited 1") and "no CUDA device is visible" in error
    with pytest.raises(CheckError, match="rank 1: boom"):
        bench_gpu._node_row({"name": "x", "status": "fail", "detail": "rank 1: boom"})
    assert bench_gpu._node_row({"name": "x", "status": "skip", "detail": "why"}).status == "skip"
