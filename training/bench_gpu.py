"""``unmix bench gpu``: one command that proves a GPU node (or, with ``--dry-run``, everything short of it).

Every check reports pass / fail / skip and a figure; the exit status is 1 when any check failed, 2 when
there is no CUDA device and ``--dry-run`` was not given, else 0. The checks, in order:

CPU side (also the whole of ``--dry-run``, which CI runs):
- ``configs``: the ResNet-50 MoCo v2 / BYOL bf16 configs, Un-Mix off and on, resolve;
- ``models (meta)``: both methods' online and target networks built on the meta device (no memory),
  target fp32 without gradients, MoCo queue fp32, SyncBatchNorm in the query encoder only (MoCo) and in
  both networks (BYOL);
- ``synthetic source (cpu)``: ``data.source=synthetic`` batches, mixing exact (:func:`mixture_mode`);
- ``deepspeed config zero-1/zero-2``: our DeepSpeed config for ZeRO 1 and 2 at bf16, parsed by
  DeepSpeed's own ``DeepSpeedConfig``;
- ``gpu graph definitions``: the loaders' ``device="gpu"`` DALI graphs checked by
  ``unmix.pipeline.graph_check`` (reported as not available when this build lacks that module).

The node (``--nproc N`` ranks, default all visible GPUs; ``--dry-run``: 2 CPU ranks on gloo, a tiny model),
launched by the command itself (:mod:`unmix.training.bench_node`): Shuffle-BN across ranks against an
unshuffled reference, SyncBN, the MoCo key gather + enqueue, ZeRO-1/2 steps, a checkpoint written and
resumed, and images/s per GPU, data-wait fraction and peak memory per GPU for MoCo v2 and BYOL + Un-Mix.

CUDA (one process, a one-process NCCL group, ``data.source=synthetic`` on the device):
- ``train <method> unmix=<off|on>``: ResNet-50, crop 224, bf16: images/s, peak memory
  (``torch.cuda.max_memory_allocated``), loss finite, EMA target and queue still fp32;
- ``deepspeed zero-<1|2> step``: optimizer steps under ZeRO 1 and 2 at bf16;
- ``nccl all_gather + shuffle-bn``: the gather of channels_last bf16 images and Shuffle-BN's
  permutation round trip run as collectives on the NCCL group; also reports whether this torch build
  gathers into channels_last receive buffers correctly (pytorch issue 163483; informational);

DALI on the GPU (when ``nvidia.dali`` imports), on ``unmix shards sample photos`` data or ``--data``:
- ``dali loader <recipe>``: batches/s of the pretraining loader with Un-Mix at crop 224;
- ``dali mixing exact (gpu)``: every batch's mixture is exactly view1 mixed with its reversed partner
  (mixup formula or a CutMix box copy, lam recomputed), including boxes with a 1-px side (lam ~ 1),
  never an empty one;
- ``dali cpu vs gpu distribution``: per-channel means/stds of the CPU and GPU loaders' views (same
  seed; the random streams differ, so distributions are compared, within 4 standard errors);
- ``data wait (dali -> step)``: the fraction of wall time the real step waits for the real loader
  (the loop's ``data_wait_fraction``), which must stay under 5 % at ResNet-50 bf16, and the images/s
  against the synthetic source.

Finally ``pytest -m gpu`` (the tests that need CUDA) runs in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from unmix.training import methods

DATA_WAIT_LIMIT = 0.05  # the loop may wait for data at most 5 % of its wall time (R50, bf16)
SAMPLE_IMAGES = 1600  # `unmix shards sample photos` size written when --data is not given (1280 train)


class CheckError(AssertionError):
    """A check's condition did not hold; the message says what was measured."""


@dataclass
class Check:
    """One row of the report."""

    name: str
    status: str  # "pass" | "fail" | "skip"
    figure: str = ""
    detail: str = ""
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)


class Report:
    """Runs checks in order within a time budget; a check that raises is a failure, not an abort."""

    def __init__(self, budget_s: float, verbose: bool = True):
        self.checks: list[Check] = []
        self.start = time.perf_counter()
        self.budget_s = budget_s
        self.verbose = verbose

    def run(self, name: str, fn: Callable[[], tuple[str, dict[str, Any]] | Check]) -> Check:
        """``fn`` returns ``(figure, values)`` on success, or a ready :class:`Check` (e.g. a skip)."""
        if time.perf_counter() - self.start > self.budget_s:
            check = Check(name, "fail", detail=f"not run: the time budget of {self.budget_s:.0f} s is spent")
        else:
            t0 = time.perf_counter()
            try:
                out = fn()
                check = out if isinstance(out, Check) else Check(name, "pass", out[0], values=out[1])
                check.name = name
            except Exception as exc:  # a failed check is reported, and the next one runs
                check = Check(name, "fail", detail=f"{type(exc).__name__}: {exc}"[:500])
            check.seconds = time.perf_counter() - t0
        self.checks.append(check)
        if self.verbose:
            print(f"[unmix bench gpu] {check.status:4s} {name}: {check.figure or check.detail}", flush=True)
        return check

    @property
    def failed(self) -> bool:
        return any(c.status == "fail" for c in self.checks)

    def table(self) -> str:
        width = max([len(c.name) for c in self.checks] + [5])
        lines = [f"{'check':{width}s}  status  figure / detail", "-" * (width + 40)]
        for c in self.checks:
            text = c.figure if c.status == "pass" else (c.detail or c.figure)
            lines.append(f"{c.name:{width}s}  {c.status:6s}  {text}")
        return "\n".join(lines)


def skip(reason: str) -> Check:
    return Check("", "skip", detail=reason)


# ------------------------------------------------------------------------------------------- mixing


def mixture_mode(view1: torch.Tensor, mixed: torch.Tensor, lam: torch.Tensor) -> str:
    """Check one batch's Un-Mix mixture against its rule, on whatever device it lives; return the mode.

    ``"mixup"``: ``mixed == lam * view1 + (1 - lam) * view1.flip(0)`` (to float rounding);
    ``"cutmix"``: every pixel is view1's or its partner's, the partner's pixels lie in one rectangle
    shared by the batch, and lam is 1 - (box area / image area) (the same bounds as the CPU tests').
    Raises :class:`CheckError` otherwise.
    """
    v1, m = view1.float(), mixed.float()
    n, _, H, W = v1.shape
    if lam.shape != (n,) or lam.dtype != torch.float32:
        raise CheckError(f"lam has shape {tuple(lam.shape)} and dtype {lam.dtype}; expected ({n},) float32")
    if not bool(torch.all(lam == lam[0])):
        raise CheckError("lam differs within the batch (one lam per batch expected)")
    partner = v1.flip(0)
    lam4 = lam.view(-1, 1, 1, 1).to(v1.device)
    if torch.allclose(m, lam4 * v1 + (1 - lam4) * partner, atol=1e-5, rtol=0):
        return "mixup"
    if not bool(torch.all((m == v1) | (m == partner))):
        raise CheckError("a pixel of the mixture is neither the mixup formula nor view1's or its partner's")
    surely = ((m == partner) & (m != v1)).any(dim=0).any(dim=0)  # HxW: pixels only the partner has
    ys, xs = torch.nonzero(surely, as_tuple=True)
    if len(ys) == 0:
        raise CheckError("CutMix batch with no pixel from the partner but lam < 1")
    y1, y2, x1, x2 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    inside = torch.zeros_like(surely)
    inside[y1:y2, x1:x2] = True
    not_pasted = ((m == v1) & (m != partner)).any(dim=0).any(dim=0)
    if bool((not_pasted & inside).any()):
        raise CheckError("an unpasted pixel inside the pasted rectangle")
    area = float(inside.sum()) / (H * W)
    lam0 = float(lam[0])
    if not (1 - 1.3 * area - 2 * (H + W) / (H * W) <= lam0 <= 1 - area + 1e-6):
        raise CheckError(f"lam {lam0:.6f} does not match the pasted area fraction {area:.6f}")
    return "cutmix"


# ------------------------------------------------------------------------------------ CPU-side checks

CHECKED_METHODS = methods.one_per_module()  # moco_v2, byol, simclr: each implementation once


def r50_overrides(
    method: str, unmix: bool, batch: int, zero: int = 0, source: str = "synthetic"
) -> list[str]:
    """A one-GPU ResNet-50 bf16 pretraining config of ``method`` (the ImageNet recipes' models)."""
    out = [
        f"method.name={method}",
        f"unmix.enabled={str(unmix).lower()}",
        "model.arch=resnet50",
        f"data.source={source}",
        "data.device=gpu",
        "data.crop=224",
        f"data.synthetic_samples={batch * 10_000}",
        f"optim.batch_size={batch}",
        "deepspeed.precision=bf16",
        f"deepspeed.zero_stage={zero}",
        "mlflow.enabled=false",
    ]
    if zero == 0 and methods.spec(method).optimizer == "lars":
        out.append("optim.optimizer=lars")
    return out


def check_configs() -> tuple[str, dict]:
    from unmix.training.config import load_config

    n = 0
    for method in CHECKED_METHODS:
        for unmix in (False, True):
            cfg = load_config(None, r50_overrides(method, unmix, 128))
            if cfg.deepspeed.precision != "bf16" or cfg.model.arch != "resnet50":
                raise CheckError(f"{method}: resolved to {cfg.deepspeed.precision} {cfg.model.arch}")
            n += 1
    return f"{n} configs resolve", {"configs": n}


def check_models_meta() -> tuple[str, dict]:
    """Both methods' networks at full size on the meta device; dtypes, gradients and SyncBN placement."""
    from torch import nn

    from unmix.training import sync_bn
    from unmix.training.backbones import build_backbone
    from unmix.training.config import load_config

    values = {}
    for method in CHECKED_METHODS:
        cfg = load_config(None, r50_overrides(method, True, 128))
        with torch.device("meta"):
            backbone = build_backbone("resnet50", crop=224)
            online, m = methods.build(cfg, backbone, 8, 16, "meta")  # 8 ranks: no SplitBatchNorm
            online = online.to(memory_format=torch.channels_last)
        online, m.target = sync_bn.convert(online, m.target, sync_target=m.sync_target)
        target = m.target if m.target is not None else nn.Identity()
        if any(p.dtype != torch.float32 or p.requires_grad for p in target.parameters()):
            raise CheckError(f"{method}: the target network is not fp32 without gradients")
        if any(t.dtype != torch.float32 for t in m.replicated() if t.is_floating_point()):
            raise CheckError(f"{method}: a replicated tensor (target, queue) is not fp32")
        target_sync = any(isinstance(x, nn.SyncBatchNorm) for x in target.modules())
        if target_sync != (m.sync_target and m.target is not None):
            raise CheckError(f"{method}: target SyncBatchNorm is {target_sync}")
        values[method] = {
            "online_params": sum(p.numel() for p in online.parameters()),
            "target_params": sum(p.numel() for p in target.parameters()),
        }
    fig = ", ".join(f"{k} online {v['online_params'] / 1e6:.1f} M params" for k, v in values.items())
    return fig, values


def check_synthetic_cpu() -> tuple[str, dict]:
    from unmix.training.synthetic import SyntheticLoader

    loader = SyntheticLoader(8, 32, samples=8 * 40, unmix=True, seed=0)
    modes = [mixture_mode(b["view1"], b["mixed"], b["lam"]) for b in loader]
    if set(modes) != {"mixup", "cutmix"}:
        raise CheckError(f"modes seen in 40 batches: {sorted(set(modes))}")
    return f"{len(modes)} batches exact ({modes.count('mixup')} mixup, {modes.count('cutmix')} cutmix)", {}


def check_deepspeed_configs() -> tuple[str, dict]:
    from deepspeed.runtime.config import DeepSpeedConfig

    from unmix.training.config import load_config
    from unmix.training.engine import deepspeed_config

    for zero in (1, 2):
        cfg = load_config(None, r50_overrides("moco_v2", True, 128, zero))
        ds = DeepSpeedConfig(deepspeed_config(cfg, 128))
        got = (
            ds.zero_optimization_stage,
            ds.torch_autocast_enabled,
            ds.torch_autocast_dtype,
            ds.gradient_clipping,
        )
        if got[0] != zero or not got[1] or got[2] != torch.bfloat16 or got[3] != 0.0:
            raise CheckError(f"ZeRO-{zero}: DeepSpeed read (stage, autocast, dtype, clipping) = {got}")
        if ds.torch_autocast_lower_precision_safe_modules != []:
            raise CheckError(f"ZeRO-{zero}: gradients of some modules would be reduced in bf16")
    return "ZeRO 1 and 2, bf16 autocast, fp32 gradient reduction, no clipping", {}


def check_gpu_graphs() -> tuple[str, dict] | Check:
    """The loaders' GPU graph definitions, through unmix.pipeline.graph_check."""
    try:
        from unmix.pipeline import graph_check
        from unmix.pipeline.graph_check import device_report
    except ImportError as exc:
        if "nvidia" in str(exc) or "dali" in str(exc).lower():
            return skip("DALI is not installed")
        return skip("not available in this build (no unmix.pipeline.graph_check)")
    n = 0
    for name, pipe, outputs in graph_check.gpu_graph_definitions():
        report = device_report(pipe, outputs)
        if not report.ok:
            raise CheckError(f"{name}: " + "; ".join(report.problems))
        n += 1
    return f"{n} GPU graph definitions checked", {"graphs": n}


# --------------------------------------------------------------------------------------- CUDA checks


def _endless(loader) -> Iterator[dict]:
    while True:
        yield from loader


def _take(loader, n: int) -> Iterator[dict]:
    """The next ``n`` batches of ``loader``, across epochs."""
    it = _endless(loader)
    return (next(it) for _ in range(n))


def _free_cuda() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _fp32_state(run) -> tuple[bool, bool]:
    """(target fp32, every replicated tensor (target, queue) fp32); true where the method has none."""
    target = run.method.target is None or all(
        p.dtype == torch.float32 for p in run.method.target.parameters()
    )
    replicated = all(t.dtype == torch.float32 for t in run.method.replicated() if t.is_floating_point())
    return target, replicated


def _time_steps(run, batches: Iterator[dict], warmup: int, steps: int, wait: list[float] | None = None):
    """Run ``warmup`` then ``steps`` training steps; returns (seconds of the timed steps, losses)."""
    from unmix.training.loop import train_step

    lr = run.cfg.optim.lr * run.cfg.optim.batch_size / 256
    losses = []
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
        tw = time.perf_counter()
        batch = next(batches)
        if wait is not None and i >= warmup:
            wait.append(time.perf_counter() - tw)
        loss, _, _ = train_step(run, batch, i, lr, run.method.momentum(i, 10**6))
        losses.append(loss)
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.stack(losses).float()


def check_train(method: str, unmix: bool, batch: int, warmup: int, steps: int) -> tuple[str, dict]:
    from unmix.training.config import load_config
    from unmix.training.loop import setup

    run = setup(load_config(None, r50_overrides(method, unmix, batch)))
    try:
        watched = run.method.target if run.method.target is not None else run.engine.module  # EMA / SGD
        before = next(watched.parameters()).detach().clone()
        seconds, losses = _time_steps(run, _endless(run.loader), warmup, steps)
        peak = torch.cuda.max_memory_allocated() / 2**30
        target32, queue32 = _fp32_state(run)
        moved = not torch.equal(before, next(watched.parameters()))
        if not bool(torch.isfinite(losses).all()):
            raise CheckError(f"non-finite loss: {losses.tolist()}")
        if not (target32 and queue32):
            raise CheckError(f"target fp32 {target32}, queue fp32 {queue32}")
        if not moved:
            raise CheckError("the EMA target (or, without one, the online network) did not move")
        ips = steps * batch / seconds
        values = {"images_per_s": ips, "peak_gib": peak, "batch": batch, "loss_last": float(losses[-1])}
        return f"{ips:8.1f} img/s, peak {peak:5.1f} GiB, batch {batch}", values
    finally:
        del run
        _free_cuda()


def check_zero(stage: int, batch: int) -> tuple[str, dict]:
    from unmix.training.config import load_config
    from unmix.training.loop import setup

    run = setup(load_config(None, r50_overrides("moco_v2", True, batch, stage)))
    try:
        params = [p for p in run.engine.module.parameters() if p.requires_grad][:4]
        before = [p.detach().clone() for p in params]
        _, losses = _time_steps(run, _endless(run.loader), 0, 2)
        if run.engine.zero_optimization_stage() != stage:
            raise CheckError(f"the engine runs ZeRO stage {run.engine.zero_optimization_stage()}")
        if not bool(torch.isfinite(losses).all()):
            raise CheckError(f"non-finite loss: {losses.tolist()}")
        if not any(not torch.equal(b, p) for b, p in zip(before, params, strict=True)):
            raise CheckError("the optimizer step changed no parameter")
        target32, queue32 = _fp32_state(run)
        if not (target32 and queue32 and all(p.dtype == torch.float32 for p in params)):
            raise CheckError(f"target fp32 {target32}, queue fp32 {queue32}, online {params[0].dtype}")
        return f"2 steps, loss {float(losses[-1]):.3f}, weights/target/queue fp32", {"loss": losses.tolist()}
    finally:
        del run
        _free_cuda()


def check_nccl() -> tuple[str, dict]:
    """Collectives on the one-process NCCL group: channels_last bf16 images, Shuffle-BN's round trip."""
    import torch.distributed as tdist
    from torch import nn

    from unmix.training import dist
    from unmix.training.heads import Network
    from unmix.training.moco import shuffled_embed

    dist.init("nccl")
    backend = tdist.get_backend()
    if backend != "nccl":
        raise CheckError(f"the process group runs {backend}, not nccl")
    group = tdist.group.WORLD
    device = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(32, 3, 56, 56, generator=g, device=device).contiguous(memory_format=torch.channels_last)
    xb = x.to(torch.bfloat16)
    gathered = dist.gather_rows(xb, group)
    if not torch.equal(gathered, xb) or not gathered.is_contiguous(memory_format=torch.channels_last):
        raise CheckError("gather_rows of channels_last bf16 images changed them or their layout")
    torch.manual_seed(0)
    net = Network(nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(8, 4))
    net = net.to(device).to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        k = shuffled_embed(net, x, torch.Generator().manual_seed(1), group=group)
        k_local = net.embed(x)
    if not torch.allclose(k.float(), k_local.float(), atol=2e-2, rtol=2e-2):
        raise CheckError("Shuffle-BN on the NCCL group did not return the keys in input order")
    # informational: does this torch build gather into channels_last receive buffers correctly?
    raw = [torch.empty_like(xb) for _ in range(tdist.get_world_size())]
    try:
        tdist.all_gather(raw, xb.contiguous())
        raw_ok = "correct" if torch.equal(raw[0], xb) else "SCRAMBLED (pytorch#163483; unmix allocates NCHW)"
    except Exception as exc:  # newer builds refuse non-contiguous receive buffers
        raw_ok = f"refused ({type(exc).__name__})"
    return f"all_gather + Shuffle-BN exact; raw channels_last buffers: {raw_ok}", {
        "raw_channels_last": raw_ok
    }


# --------------------------------------------------------------------------------------- DALI checks


def dali_version() -> str | None:
    try:
        import nvidia.dali as dali
    except ImportError:
        return None
    return str(dali.__version__)


def sample_data(root: Path) -> Path:
    """``unmix shards sample photos`` (``SAMPLE_IMAGES`` images) under ``root``; the train split."""
    from unmix.pipeline.shards.sample import write_sample

    write_sample("photos", root, n_images=SAMPLE_IMAGES)
    return root / "train"


def train_split(data: str) -> Path:
    """``--data``: a shard directory (with manifest.json) or a sample root holding ``train/``."""
    p = Path(data)
    if (p / "manifest.json").is_file() or p.name == "manifest.json":
        return p
    if (p / "train" / "manifest.json").is_file():
        return p / "train"
    raise FileNotFoundError(f"--data {data}: no manifest.json in it or in {p / 'train'}")


def _loader(
    train: Path, batch: int, recipe: str, threads: int, device: str = "gpu", unmix: Any = True, seed: int = 0
):
    from unmix.pipeline.loaders import build_pretrain_loader

    return build_pretrain_loader(
        train, batch, recipe=recipe, crop=224, unmix=unmix, device=device, seed=seed, num_threads=threads
    )


def check_dali_loader(train: Path, recipe: str, batch: int, threads: int, n: int) -> tuple[str, dict]:
    loader = _loader(train, batch, recipe, threads)
    it = _endless(loader)
    for _ in range(5):
        next(it)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        b = next(it)
    torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    if not b["view1"].is_cuda:
        raise CheckError("the GPU loader handed out CPU tensors")
    return f"{rate:8.2f} batches/s ({rate * batch:.0f} img/s), batch {batch}", {"batches_per_s": rate}


def check_dali_mixing(train: Path, batch: int, threads: int) -> tuple[str, dict]:
    modes: dict[str, int] = {"mixup": 0, "cutmix": 0}
    for b in _take(_loader(train, batch, "moco_v2", threads), 24):
        modes[mixture_mode(b["view1"], b["mixed"], b["lam"])] += 1
    if not all(modes.values()):
        raise CheckError(f"24 batches gave {modes}; both modes expected")
    # alpha 0.05: lam near 0 or 1, so CutMix boxes are often 1 px wide or whole (fn.multi_paste edge
    # cases); an empty box would leak the partner on the GPU, and must never be emitted
    extreme = _loader(train, batch, "moco_v2", threads, unmix={"alpha": 0.05, "p_mixup": 0.0}, seed=1)
    thin = 0
    for b in _take(extreme, 16):
        if mixture_mode(b["view1"], b["mixed"], b["lam"]) != "cutmix" or float(b["lam"][0]) == 1.0:
            raise CheckError(f"a CutMix batch (p_mixup 0) pasted nothing: lam {float(b['lam'][0])}")
        thin += int(float(b["lam"][0]) >= 1 - 1 / 224)  # a box of at most 224 px: a 1-px side
    return (
        f"{sum(modes.values())} batches exact ({modes['mixup']} mixup, {modes['cutmix']} cutmix); "
        f"16 extreme-lam CutMix batches exact ({thin} with a 1-px side, none empty)",
        {**modes, "thin_boxes": thin},
    )


def _channel_stats(loader, n: int) -> torch.Tensor:
    """Per batch and channel: the mean and std of view1 and view2 -> [n, 4, 3] (CPU float64)."""
    rows = []
    for b in _take(loader, n):
        v = torch.stack([b["view1"].float(), b["view2"].float()])  # 2xBx3xHxW
        rows.append(torch.cat([v.mean(dim=(1, 3, 4)), v.std(dim=(1, 3, 4))]).double().cpu())
    return torch.stack(rows)


def check_dali_cpu_vs_gpu(train: Path, batch: int, threads: int) -> tuple[str, dict]:
    n = 8
    gpu = _channel_stats(_loader(train, batch, "moco_v2", threads, unmix=False), n)
    cpu = _channel_stats(_loader(train, batch, "moco_v2", threads, device="cpu", unmix=False), n)
    diff = (gpu.mean(0) - cpu.mean(0)).abs()
    se = (gpu.var(0) / n + cpu.var(0) / n).sqrt()
    limit = 4 * se + 0.02
    worst = float((diff / limit).max())
    values = {"gpu": gpu.mean(0).tolist(), "cpu": cpu.mean(0).tolist(), "worst_ratio_to_limit": worst}
    if worst > 1:
        raise CheckError(
            f"per-channel means/stds differ by up to {worst:.2f}x the limit (4 s.e. + 0.02): {values}"
        )
    return f"means/stds within {worst:.2f} of 4 s.e. (8 batches each)", values


def check_data_wait(train: Path, batch: int, threads: int, warmup: int, steps: int) -> tuple[str, dict]:
    """The real loader feeding the real step; the wait is measured like the loop's data_wait_fraction."""
    from unmix.training.config import load_config
    from unmix.training.loop import setup

    overrides = r50_overrides("moco_v2", True, batch, source="dali") + [
        f"data.train={train}",
        f"data.threads={threads}",
    ]
    run = setup(load_config(None, overrides))
    try:
        wait: list[float] = []
        seconds, losses = _time_steps(run, _endless(run.loader), warmup, steps, wait)
        fraction = sum(wait) / seconds
        ips = steps * batch / seconds
        values = {"data_wait_fraction": fraction, "images_per_s": ips, "steps": steps}
        if not bool(torch.isfinite(losses).all()):
            raise CheckError("non-finite loss")
        if fraction >= DATA_WAIT_LIMIT:
            raise CheckError(
                f"data wait {fraction:.1%} of the step time (limit {DATA_WAIT_LIMIT:.0%}); {ips:.0f} img/s"
            )
        return f"{fraction:6.2%} waiting (limit {DATA_WAIT_LIMIT:.0%}), {ips:.0f} img/s", values
    finally:
        del run
        _free_cuda()


# --------------------------------------------------------------------------------------------- tests


def tests_dir() -> Path | None:
    """The checkout's tests/ (an editable install), or None when installed from a wheel."""
    import unmix

    root = Path(unmix.__file__).resolve().parents[1] / "tests"
    return root if (root / "conftest.py").is_file() else None


def check_gpu_tests(timeout_s: float, with_dali: bool) -> tuple[str, dict] | Check:
    root = tests_dir()
    if root is None:
        return skip(
            "no tests/ next to the package (installed from a wheel): run `pytest -m gpu` in a checkout"
        )
    targets = [str(root)] if with_dali else [str(root / "training")]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *targets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 30), cwd=root.parent)
    last = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode != 0:
        raise CheckError(f"pytest -m gpu exited {proc.returncode}: {last}\n{proc.stdout[-1500:]}")
    scope = "" if with_dali else " (tests/training only: DALI is not installed)"
    return f"{last}{scope}", {"summary": last}


# ------------------------------------------------------------------------------- the node (--nproc)


def run_node_checks(args: argparse.Namespace, report: Report) -> None:
    """``--nproc N`` ranks on this node (:mod:`unmix.training.bench_node`), launched by this command; with
    ``--dry-run`` 2 CPU ranks on gloo with a tiny model (the launcher and every check's code path)."""
    from unmix.training import bench_node

    nproc = getattr(args, "nproc", None)
    nproc = bench_node.default_nproc(args.dry_run) if nproc is None else nproc
    if nproc < 2:
        report.run("node launcher", lambda: skip(f"--nproc {nproc}: no second rank to check against"))
        return
    try:
        data = str(train_split(args.data)) if args.data else ""
    except FileNotFoundError as exc:
        message = str(exc)

        def bad_data() -> tuple[str, dict]:
            raise CheckError(message)

        report.run("node launcher", bad_data)
        return
    spec = {
        "dry_run": bool(args.dry_run),
        "batch": 8 if args.dry_run else args.batch_size,
        "steps": 2 if args.dry_run else args.steps,
        "warmup": 1 if args.dry_run else args.warmup,
        "data": data,
        "threads": args.threads,
    }
    left = report.budget_s - (time.perf_counter() - report.start)
    backend = "gloo, CPU" if args.dry_run else "nccl"
    t0 = time.perf_counter()
    rows, error = bench_node.launch(spec, nproc, max(left, 0.0) + bench_node.WORKER_GRACE_S)
    seconds = time.perf_counter() - t0

    def launcher() -> tuple[str, dict]:
        if error:
            raise CheckError(error)
        return f"{nproc} ranks ({backend}) launched and finished in {seconds:.0f} s", {"nproc": nproc}

    report.run("node launcher", launcher)
    for row in rows:
        report.run(row["name"], lambda row=row: _node_row(row))


def _node_row(row: dict[str, Any]) -> tuple[str, dict] | Check:
    if row["status"] == "skip":
        return skip(row["detail"])
    if row["status"] == "fail":
        raise CheckError(row["detail"])
    return row["figure"], {**row.get("values", {}), "seconds": row.get("seconds")}


# ---------------------------------------------------------------------------------------------- main


def environment() -> dict[str, Any]:
    from unmix.training.versions import VersionError, dali_flavour, driver_version, installed

    cuda = torch.cuda.is_available()
    try:
        flavour = dali_flavour()
    except VersionError:
        flavour = None
    return {
        "host": platform.node(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": driver_version(),
        "deepspeed": installed("deepspeed"),
        "device": torch.cuda.get_device_name() if cuda else None,
        "device_count": torch.cuda.device_count() if cuda else 0,
        "dali": dali_version(),
        "dali_wheel": flavour[0] if flavour else None,
    }


def run_checks(args: argparse.Namespace, report: Report) -> None:
    report.run("configs", check_configs)
    report.run("models (meta)", check_models_meta)
    report.run("synthetic source (cpu)", check_synthetic_cpu)
    report.run("deepspeed config zero-1/zero-2", check_deepspeed_configs)
    report.run("gpu graph definitions", check_gpu_graphs)
    run_node_checks(args, report)
    if args.dry_run:
        return
    b = args.batch_size
    for method in CHECKED_METHODS:
        for unmix in (False, True):
            name = f"train {method} unmix={'on' if unmix else 'off'}"
            report.run(name, lambda m=method, u=unmix: check_train(m, u, b, args.warmup, args.steps))
    for stage in (1, 2):
        report.run(f"deepspeed zero-{stage} step", lambda s=stage: check_zero(s, min(b, 64)))
    report.run("nccl all_gather + shuffle-bn", check_nccl)

    with_dali = dali_version() is not None
    if not with_dali:
        for name in (
            "dali loader",
            "dali mixing exact (gpu)",
            "dali cpu vs gpu distribution",
            "data wait",
        ):
            report.run(name, lambda: skip("DALI is not installed (nvidia-dali-cuda120)"))
    else:
        with contextlib.ExitStack() as stack:
            found: list[Path] = []

            def data() -> tuple[str, dict]:
                if args.data:
                    found.append(train_split(args.data))
                    return f"--data {found[0]}", {"dir": str(found[0])}
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="unmix-bench-gpu-")))
                found.append(sample_data(tmp))
                return f"unmix shards sample photos: {SAMPLE_IMAGES} images", {"dir": str(found[0])}

            report.run("data", data)
            if not found:
                return
            train = found[0]
            threads = args.threads
            for recipe in ("moco_v2", "byol"):
                report.run(
                    f"dali loader {recipe} + unmix",
                    lambda r=recipe: check_dali_loader(train, r, b, threads, 30),
                )
            report.run("dali mixing exact (gpu)", lambda: check_dali_mixing(train, min(b, 64), threads))
            report.run("dali cpu vs gpu distribution", lambda: check_dali_cpu_vs_gpu(train, 64, threads))
            report.run("data wait", lambda: check_data_wait(train, b, threads, 5, 30))
    if args.no_tests:
        report.run("pytest -m gpu", lambda: skip("--no-tests"))
    else:
        left = report.budget_s - (time.perf_counter() - report.start)
        report.run("pytest -m gpu", lambda: check_gpu_tests(left, with_dali))


def main(args: argparse.Namespace) -> int:
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "unmix bench gpu: error: no CUDA device is visible (torch.cuda.is_available() is False); "
            "run it on a GPU node, or pass --dry-run for the checks that need no GPU",
            file=sys.stderr,
        )
        return 2
    accelerator = os.environ.get("DS_ACCELERATOR")
    if not args.dry_run and accelerator not in (None, "", "cuda"):
        print(
            f"unmix bench gpu: error: DS_ACCELERATOR={accelerator} would run DeepSpeed off the GPU; "
            "unset it (or set it to cuda)",
            file=sys.stderr,
        )
        return 2
    from unmix.training.versions import VersionError, check, stack_line

    try:
        warnings = check(need_dali=False)  # a missing DALI is reported by the DALI checks (skipped)
    except VersionError as exc:
        print(f"unmix bench gpu: error: {exc}", file=sys.stderr)
        return 2
    env = environment()
    mode = "dry run (no CUDA needed)" if args.dry_run else f"{env['device']} x{env['device_count']}"
    print(f"unmix bench gpu: {stack_line()}; {mode}")  # first line: torch's CUDA, driver, DALI flavour
    for line in warnings:
        print(f"unmix bench gpu: warning: {line}")
    report = Report(args.budget_s)
    run_checks(args, report)
    print()
    print(report.table())
    failed = [c.name for c in report.checks if c.status == "fail"]
    print(
        f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}"
        f" ({time.perf_counter() - report.start:.0f} s)"
    )
    if args.json:
        summary = {
            "dry_run": bool(args.dry_run),
            "environment": env,
            "batch_size": args.batch_size,
            "passed": not failed,
            "checks": [asdict(c) for c in report.checks],
        }
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    if not args.dry_run and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failed else 0
