"""``unmix bench train``: this trainer's step throughput against a plain PyTorch loop, and Un-Mix's cost.

All variants train on the same batches, taken once from the real loader and held in memory, so the
figures measure the step (forward, backward, optimizer, EMA, queue), not the data pipeline:

- ``trainer``: :func:`training.loop.train_step` (DeepSpeed engine, fp32 target and queue, schedules);
- ``plain``: the same method and model written as a plain PyTorch loop (``torch.optim``, no DeepSpeed):
  the same loss (symmetric or not, every Un-Mix term) and, on one process, the same SplitBatchNorm and
  key shuffle;
- each with Un-Mix on and off. Single steps of the four variants are interleaved (rotating order) and
  the median step time of each is reported, so load changes on a shared machine hit all variants alike.

The goals (issue 4): trainer / plain >= 0.95 on the CPU; Un-Mix on / off about 1.75x for MoCo (one more
query forward and backward on top of query + key forwards and the query backward).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unmix.training.batchnorm import num_splits
from unmix.training.config import Config, load_config
from unmix.training.losses import byol_regression, info_nce, info_nce_mixed_keys, unmix_weighted


class MemoryLoader:
    """A loader over batches held in memory (same interface as the pipeline's loader)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _cached_batches(cfg: Config, n: int) -> list[dict[str, torch.Tensor]]:
    from unmix.training import dist
    from unmix.training.config import check_world
    from unmix.training.loop import build_loader

    micro = check_world(cfg, dist.world_size())
    loader = build_loader(cfg, micro, dist.rank(), dist.world_size())
    out = []
    while len(out) < n:
        for b in loader:
            out.append({k: v.clone() for k, v in b.items()})
            if len(out) == n:
                break
    return out


def _cycling(step, batches):
    """A no-argument callable running ``step(i, batch)`` on the i-th call, cycling through ``batches``."""
    counter = itertools.count()

    def run() -> None:
        i = next(counter)
        step(i, batches[i % len(batches)])

    return run


def _trainer_step(run, batches):
    from unmix.training.loop import train_step

    return _cycling(lambda i, b: train_step(run, b, i, 0.01, run.method.momentum(i, 10**6)), batches)


def _plain_step(plain, batches):
    return _cycling(lambda i, b: plain.step(b), batches)


class PlainLoop:
    """The same method written as a plain PyTorch loop: one module, torch.optim, fp32, no DeepSpeed."""

    def __init__(self, run, unmix: bool):
        cfg = run.cfg
        self.unmix, self.cfg, self.device = unmix, cfg, run.device
        self.online = copy.deepcopy(run.engine.module).float()
        self.target = copy.deepcopy(run.method.target)
        self.queue = run.method.queue.queue.clone() if run.method.queue is not None else None
        self.ptr = 0
        self.splits = num_splits(self.target)  # SplitBatchNorm on one process (Shuffle-BN's emulation)
        self.generator = torch.Generator().manual_seed(0)
        lr = 0.01
        self.opt = torch.optim.SGD(
            self.online.parameters(), lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )

    def _keys(self, x: torch.Tensor) -> torch.Tensor:
        """Key encoder forward; with SplitBatchNorm (one process) shuffled first, as the authors' code."""
        if self.splits <= 1:
            return self.target.embed(x)
        idx = torch.randperm(x.shape[0], generator=self.generator).to(x.device)
        return self.target.embed(x[idx])[torch.argsort(idx)]

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        b = {k: v.to(self.device) for k, v in batch.items()}
        x1, x2 = b["view1"], b["view2"]
        lam = b["lam"] if self.unmix else None
        if self.cfg.method.name == "byol":
            with torch.no_grad():
                z1, z2 = self.target.embed(x1), self.target.embed(x2)
            p1, p2 = self.online.embed(x1), self.online.embed(x2)
            loss = byol_regression(p1, z2).mean() + byol_regression(p2, z1).mean()
            if self.unmix:
                p_m = self.online.embed(b["mixed"])
                for z in (z2, z1) if self.cfg.method.byol.mix_targets == "both" else (z2,):
                    mix = unmix_weighted(byol_regression(p_m, z), byol_regression(p_m.flip(0), z), lam)
                    loss = loss + mix
        else:
            T, symmetric = float(self.cfg.method.moco.T), self.cfg.method.moco.symmetric
            with torch.no_grad():
                keys = (self._keys(x2), self._keys(x1)) if symmetric else (self._keys(x2),)
            loss = info_nce(self.online.embed(x1), keys[0], self.queue, T).mean()
            if symmetric:
                loss = loss + info_nce(self.online.embed(x2), keys[1], self.queue, T).mean()
            if self.unmix:
                z_m = self.online.embed(b["mixed"])
                for pair in info_nce_mixed_keys(z_m, keys, self.queue, T):
                    loss = loss + unmix_weighted(*pair, lam)
            k = torch.cat(keys)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            m = 0.99
            for p_t, p_o in zip(self.target.parameters(), self.online.parameters(), strict=False):
                p_t.mul_(m).add_(p_o.detach(), alpha=1 - m)
            if self.queue is not None:
                k = F.normalize(k, dim=1)
                idx = (self.ptr + torch.arange(k.shape[0], device=k.device)) % self.queue.shape[1]
                self.queue[:, idx] = k.T
                self.ptr = int((self.ptr + k.shape[0]) % self.queue.shape[1])


def _interleaved_step_times(steps: dict, n: int, warmup: int, device: torch.device) -> dict[str, list[float]]:
    """Time single steps of every variant in turn (rotating the order), so that a machine whose load
    changes over time (shared CI cores) slows all variants alike; returns per-step seconds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = list(steps)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(warmup + n):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            sync()
            t0 = time.perf_counter()
            steps[name]()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def _expected_cost(cfg: Config) -> str:
    """What Un-Mix should cost: one more query/online forward and backward on top of the step's passes."""
    if cfg.method.name == "byol" or cfg.method.moco.symmetric:
        return "~1.4x (one online pass added to two, plus two target forwards)"
    return "~1.75x for asymmetric MoCo (one query pass added to one, plus one key forward)"


def main(args: argparse.Namespace) -> int:
    from unmix.training import dist
    from unmix.training.loop import backend_for, setup

    base = load_config(args.config, list(args.overrides) + ["unmix.enabled=true", "mlflow.enabled=false"])
    dist.init(backend_for(base))
    batches = _cached_batches(base, max(4, min(args.steps, 8)))
    runs, plains = {}, {}
    for unmix in (False, True):
        cfg = load_config(
            args.config,
            list(args.overrides) + [f"unmix.enabled={str(unmix).lower()}", "mlflow.enabled=false"],
        )
        data = (
            batches if unmix else [{k: v for k, v in b.items() if k in ("view1", "view2")} for b in batches]
        )
        runs[unmix] = (setup(cfg, loader_factory=lambda *a, d=data: MemoryLoader(d)), data)
        plains[unmix] = (PlainLoop(runs[unmix][0], unmix), data)
    steps = {}
    for unmix in (False, True):
        u = "on" if unmix else "off"
        steps[f"trainer_{u}"] = _trainer_step(*runs[unmix])
        steps[f"plain_{u}"] = _plain_step(*plains[unmix])
    if args.layout_cost:  # the same batches as plain NCHW tensors: the loop converts them every step
        nchw = [{k: v.contiguous() for k, v in b.items()} for b in runs[True][1]]
        steps["trainer_on_nchw_input"] = _trainer_step(runs[True][0], nchw)
    results = _interleaved_step_times(steps, args.steps * args.repeats, args.warmup, runs[True][0].device)
    med = {k: 1.0 / statistics.median(v) for k, v in results.items()}  # steps/s from the median step time
    cfg = runs[True][0].cfg
    images = cfg.optim.batch_size
    summary = {
        "config": str(args.config),
        "overrides": list(args.overrides),
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "crop": cfg.data.crop,
        "global_batch": images,
        "device": str(runs[True][0].device),
        "precision": cfg.deepspeed.precision,
        "world_size": dist.world_size(),
        "torch_threads": torch.get_num_threads(),
        "steps_per_s": med,
        "images_per_s": {k: v * images for k, v in med.items()},
        "trainer_vs_plain_unmix_off": med["trainer_off"] / med["plain_off"],
        "trainer_vs_plain_unmix_on": med["trainer_on"] / med["plain_on"],
        "unmix_step_cost": med["trainer_off"] / med["trainer_on"],  # time(on) / time(off)
        "unmix_step_cost_plain": med["plain_off"] / med["plain_on"],
        "step_seconds": results,
    }
    if dist.rank() == 0:
        print(
            f"unmix bench train: {cfg.method.name} {cfg.model.arch} crop {cfg.data.crop} batch {images} "
            f"on {summary['device']} ({cfg.deepspeed.precision}, {summary['torch_threads']} threads), "
            f"median step time of {args.repeats * args.steps} interleaved steps per variant"
        )
        for k in ("trainer_off", "plain_off", "trainer_on", "plain_on"):
            print(f"  {k:12s} {med[k]:8.3f} steps/s  {med[k] * images:9.1f} images/s")
        print(
            f"  trainer / plain: {summary['trainer_vs_plain_unmix_off']:.3f} (Un-Mix off), "
            f"{summary['trainer_vs_plain_unmix_on']:.3f} (Un-Mix on)   goal >= 0.95"
        )
        print(
            f"  Un-Mix step cost (on / off): trainer {summary['unmix_step_cost']:.2f}x, "
            f"plain {summary['unmix_step_cost_plain']:.2f}x   expected {_expected_cost(cfg)}"
        )
        if args.layout_cost:
            layout = (
                "channels_last"
                if batches[0]["view1"].is_contiguous(memory_format=torch.channels_last)
                else "NCHW"
            )
            ratio = med["trainer_on"] / med["trainer_on_nchw_input"]
            summary["loader_layout_vs_nchw_input"] = ratio
            print(
                f"  loader output ({layout}) vs NCHW input converted by the loop, Un-Mix on: "
                f"{ratio:.3f}x steps/s ({med['trainer_on_nchw_input'] * images:.1f} images/s with NCHW input)"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
    sys.stdout.flush()
    return 0
