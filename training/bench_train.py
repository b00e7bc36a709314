"""``unmix bench train``: this trainer's step throughput against a plain PyTorch loop, and Un-Mix's cost.

All variants train on the same batches, taken once from the real loader and held in memory, so the
figures measure the step (forward, backward, optimizer, EMA, queue), not the data pipeline:

- ``trainer``: :func:`unmix.training.loop.train_step` (DeepSpeed engine, fp32 target and queue, schedules);
- ``plain``: the same method and model in a plain PyTorch loop (``torch.optim``, no DeepSpeed) around a
  copy of the run's method object: the same loss (every Un-Mix term), targets, EMA and queue, and on one
  process the same SplitBatchNorm and key shuffle;
- each with Un-Mix on and off. Single steps of the four variants are interleaved (rotating order) and
  the median step time of each is reported, so load changes on a shared machine hit all variants alike.

The goals: trainer / plain >= 0.95 on the CPU; Un-Mix on / off about 1.75x for MoCo (one more
query forward and backward on top of query + key forwards and the query backward); each method states
its expectation (``expected_unmix_cost``).
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

from unmix.training.config import Config, load_config
from unmix.training.ema import update_momentum


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
    """The same method as a plain PyTorch loop: one module, torch.optim, fp32, no DeepSpeed.

    It runs a copy of the run's method object (its targets, loss, EMA and queue: the same computation,
    whatever the method), so the comparison measures the engine and the loop around the method.
    """

    def __init__(self, run, unmix: bool):
        cfg = run.cfg
        self.unmix, self.cfg, self.device = unmix, cfg, run.device
        self.online = copy.deepcopy(run.engine.module).float()
        self.method = copy.deepcopy(run.method)
        self.generator = torch.Generator().manual_seed(0)
        lr = 0.01
        self.opt = torch.optim.SGD(
            self.online.parameters(), lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        b = {k: v.to(self.device) for k, v in batch.items()}
        lam = b["lam"] if self.unmix else None
        targets = self.method.targets(b, self.generator)
        outs = self.online(*self.method.online_inputs(b, self.unmix))
        loss = self.method.loss(outs, targets, lam)[0]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.method.target is not None:
            update_momentum(self.online, self.method.target, 0.99)
        mine = self.method.gathered(targets)
        if mine is not None:
            self.method.after_step(mine)


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
            f"plain {summary['unmix_step_cost_plain']:.2f}x   "
            f"expected {runs[True][0].method.expected_unmix_cost()}"
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
