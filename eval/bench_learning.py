"""``unmix bench learning``: does pretraining learn? ``unmix train``'s kNN against its own initial weights.

For each method and seed, ``unmix train`` (:func:`unmix.training.loop.train`, the whole trainer: DALI
views, Un-Mix mixing, DeepSpeed step, schedules, checkpoints, export) pretrains a ResNet-10 (width 16)
on the built-in ``shifted-digits`` sample (1,438 16x16 training images: a digit at a random place and
size on a black canvas) for 110-200 steps of 64, with the kNN monitor scoring the initial weights
(``eval.knn_at_start``: the run's own floor) and the last epoch, both on a copy whose BatchNorm
statistics are measured on the training images (``eval.knn_calibrate_bn``), so the two differ only in
the weights. The lift is the difference of the two weighted-kNN top-1 values (k 20, t 0.1; the 359 val
digits each at 5 places, 1,795 images, so that the val draw does not move a lift by ~3 points as the
359 alone did); the table gives init, end and lift as median and range over seeds.

Why this data: on the plain ``digits`` sample a random-init ResNet's kNN is already ~91 % and short runs
do not rise above it (``unmix bench fidelity``: the trainer and the reference both end below it after 3
epochs). Here a random network's kNN is ~44 % and the crops randomise exactly the nuisance (place and
size), so there is room to see learning.

What it measured (docs/benchmarks.md, "Does pretraining learn?"): over 12 seeds every run of MoCo v2
(+0.9 to +10.0), SimCLR (+2.6 to +10.8) and BYOL (+0.4 to +13.1) lifted. CI's learning guard
(``tests/eval/test_bench_learning.py``) holds each of the three to a mean lift over seeds 0 and 1 above
its margin, with an ``optim.lr=0`` run as the control. The per-method settings below are
short-schedule choices, not the paper's: MoCo v2 with a fast key encoder (m 0.9), SplitBatchNorm in 2
groups of 32 and lr 0.3; BYOL with SGD lr 0.1; SimCLR with its CIFAR LARS settings; Un-Mix on in all.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

#: The guard's per-method settings (``--method``).
METHOD_OVERRIDES: dict[str, list[str]] = {
    "moco_v2": [
        "method.name=moco_v2", "method.moco.K=512", "method.moco.m=0.9", "method.moco.T=0.2",
        "method.moco.dim=64", "method.moco.hidden_dim=256", "method.moco.bn_splits=2", "optim.optimizer=sgd",
        "optim.lr=0.3",
        "optim.weight_decay=5e-4", "optim.epochs=5",
    ],
    "byol": [
        "method.name=byol", "method.byol.proj_hidden_dim=512", "method.byol.proj_dim=64",
        "method.byol.pred_hidden_dim=512", "method.byol.tau_base=0.99", "optim.optimizer=sgd",
        "optim.lr=0.1", "optim.weight_decay=1e-4", "optim.epochs=9",
    ],
    "simclr": [
        "method.name=simclr", "data.recipe=simclr_cifar", "method.simclr.T=0.5",
        "method.simclr.proj_hidden_dim=512", "method.simclr.proj_dim=128", "optim.optimizer=lars",
        "optim.lr=1.0", "optim.weight_decay=1e-4", "optim.epochs=5",
    ],
}  # fmt: skip
COMMON_OVERRIDES = [
    "unmix.enabled=true", "data.device=cpu", "data.crop=16", "data.threads=2", "model.arch=resnet10",
    "model.width=16", "optim.batch_size=64", "optim.warmup_epochs=0", "deepspeed.precision=fp32",
    "deepspeed.zero_stage=0", "eval.knn_k=20", "eval.knn_t=0.1", "eval.knn_at_start=true",
    "eval.knn_calibrate_bn=true", "checkpoint.every_epochs=0", "checkpoint.keep=1", "log.progress=off",
    "mlflow.system_metrics=false",
]  # fmt: skip


@dataclass
class Lift:
    """One run: kNN top-1 (%) of the initial weights and after the last epoch."""

    method: str
    seed: int
    init: float
    final: float
    steps: int
    seconds: float

    @property
    def lift(self) -> float:
        return self.final - self.init


def overrides_for(method: str, data: Path, out: Path, seed: int, extra: list[str] | tuple[str, ...] = ()):
    """The config overrides of one guard run (``extra`` applied last)."""
    epochs = next(int(o.split("=")[1]) for o in METHOD_OVERRIDES[method] if o.startswith("optim.epochs="))
    return [
        *COMMON_OVERRIDES, *METHOD_OVERRIDES[method], f"eval.knn_every_epochs={epochs}",
        f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"output_dir={out}", f"seed={seed}",
        f"mlflow.tracking_uri=sqlite:///{out.parent / 'mlflow.db'}", f"mlflow.experiment=learning-{method}",
        f"mlflow.run_name={out.name}", *extra,
    ]  # fmt: skip


def run_one(method: str, data: Path, out: Path, seed: int, extra: list[str] | tuple[str, ...] = ()) -> Lift:
    """``unmix train`` once; its kNN at step 0 and at the end, read back from the run's MLflow record."""
    import mlflow

    from unmix.training.config import load_config
    from unmix.training.loop import train

    cfg = load_config(None, overrides_for(method, data, out, seed, extra))
    t0 = time.perf_counter()
    code = train(cfg)
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"unmix train ({method}, seed {seed}) exited {code}")
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{out.name}'")
    history = sorted(
        (m.step, m.value) for r in runs[:1] for m in client.get_metric_history(r.info.run_id, "knn_top1")
    )
    if len(history) < 2 or history[0][0] != 0:
        raise RuntimeError(f"{out}: expected knn_top1 at step 0 and after the last epoch, got {history}")
    return Lift(method, seed, history[0][1], history[-1][1], history[-1][0], seconds)


def summarise(lifts: list[Lift]) -> dict[str, Any]:
    """Per method: init, final and lift (median, min, max over seeds), and how many seeds lifted by more
    than 2 points (about 36 of the 1,795 val images)."""
    out: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in lifts):
        rows = [r for r in lifts if r.method == method]
        stats: dict[str, Any] = {}
        for key in ("init", "final", "lift"):
            v = [getattr(r, key) for r in rows]
            stats[key] = {"median": statistics.median(v), "min": min(v), "max": max(v)}
        stats["seeds"] = [r.seed for r in rows]
        stats["steps"] = rows[0].steps
        stats["lifted"] = sum(r.lift > 2.0 for r in rows)
        out[method] = stats
    return out


def format_table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| method + Un-Mix | steps | kNN at init | kNN at end | lift, median (min to max) | lift > 2 |",
        "|---|---|---|---|---|---|",
    ]

    def cell(v: dict[str, float], sign: str = "") -> str:
        return f"{v['median']:{sign}.1f} ({v['min']:{sign}.1f} to {v['max']:{sign}.1f})"

    for method, s in summary.items():
        lines.append(
            f"| {method} | {s['steps']} | {cell(s['init'])} | {cell(s['final'])} | {cell(s['lift'], '+')} | "
            f"{s['lifted']} of {len(s['seeds'])} |"
        )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``unmix bench learning`` (its options: :mod:`unmix.eval.cli`); returns the exit status."""
    if args.seeds < 1:
        print("unmix bench learning: error: --seeds must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="unmix-learning-") as tmp:
        from unmix.pipeline.shards.sample import sample_or_given

        try:
            data = sample_or_given(args.data, "shifted-digits", tmp)
        except ValueError as exc:
            print(f"unmix bench learning: error: {exc}", file=sys.stderr)
            return 2
        lifts = []
        for method in args.method:
            for seed in range(args.seeds):
                r = run_one(method, data, Path(tmp) / "runs" / f"{method}-{seed}", seed, args.overrides)
                print(
                    f"[{method} seed {seed}] kNN {r.init:.1f} -> {r.final:.1f} ({r.lift:+.1f}) "
                    f"in {r.steps} steps, {r.seconds:.0f} s",
                    flush=True,
                )
                lifts.append(r)
        summary = summarise(lifts)
        print("\n" + format_table(summary), flush=True)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"summary": summary, "runs": [asdict(r) for r in lifts]}, indent=1)
            )
    return 0
