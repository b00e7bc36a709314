"""``unmix bench fidelity``: ``unmix train`` against the reference training script, end to end, over seeds.

For each seed, two arms start from the same initial weights (the trainer's, copied before its first step)
and train for the same number of optimizer steps on the same shard set:

- ``unmix``: what ``unmix train`` runs: the DALI views of the config's recipe, read from the shards,
  the pipeline's Un-Mix mixing, ``loop.train_step`` (the DeepSpeed engine, the method's target and
  queue), the trainer's per-step schedule;
- ``reference``: a plain-PyTorch loop in the style of the authors' ``unmix_c10.py``: the shard images
  decoded by PIL, torchvision transforms built from the same recipe
  (:func:`unmix.pipeline.bench_pipeline.torchvision_view`, the baseline of ``unmix bench pipeline``),
  a ``torch.utils.data.DataLoader``,
  the authors' mixing (:func:`~unmix.training.fidelity.authors_mix`) and the reference step of
  :mod:`unmix.training.fidelity` (MoCo: the authors' ``ModelMoCo``; BYOL and SimCLR: written from their
  papers), ``torch.optim.SGD`` with momentum (LARS where the config asks for it: the trainer's
  implementation, the one shared piece besides the network), and the authors' schedule: cosine per
  epoch for MoCo (``adjust_learning_rate``), warm-up + cosine per step for BYOL and SimCLR (their
  papers).

Both arms are scored by the same kNN (the trainer's monitor: val-transform features, ``eval.knn_k``,
``eval.knn_t``) at init and after every epoch. The inputs of both are normalised with the ImageNet
mean and std (the authors' CIFAR script uses CIFAR's: a documented departure of the trainer, kept out
of this comparison). What is left to differ is the views (DALI's operators against torchvision's), the
loop, the schedule's granularity and the engine. The table gives, per epoch, each arm's median and range
over seeds and the mean seed-paired difference (unmix - reference) with its 95 % Student-t interval;
the verdict at the last epoch says whether each arm's median lies inside the other arm's range and
whether the paired interval holds 0.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import random
import statistics
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The built-in configurations (``--method``): small ResNet-10 runs on the built-in ``digits`` sample.
METHOD_OVERRIDES: dict[str, list[str]] = {
    "moco_v2": [
        "method.name=moco_v2", "data.recipe=moco_cifar", "method.moco.K=1024", "method.moco.m=0.99",
        "method.moco.T=0.2", "method.moco.dim=64", "method.moco.hidden_dim=256", "method.moco.symmetric=true",
        "optim.optimizer=sgd", "optim.lr=0.06", "optim.weight_decay=5e-4",
    ],
    "byol": [
        "method.name=byol", "method.byol.proj_hidden_dim=512", "method.byol.proj_dim=64",
        "method.byol.pred_hidden_dim=512", "method.byol.tau_base=0.99", "optim.optimizer=lars",
        "optim.lr=1.0", "optim.weight_decay=1.5e-6", "optim.warmup_epochs=1",
    ],
    "simclr": [
        "method.name=simclr", "data.recipe=simclr_cifar", "method.simclr.T=0.5",
        "method.simclr.proj_hidden_dim=256", "method.simclr.proj_dim=64", "optim.optimizer=lars",
        "optim.lr=1.0", "optim.weight_decay=1e-6", "optim.warmup_epochs=1",
    ],
}  # fmt: skip
COMMON_OVERRIDES = [
    "unmix.enabled=true", "data.device=cpu", "data.crop=32", "data.threads=2", "model.arch=resnet10",
    "model.width=16", "optim.batch_size=64", "deepspeed.precision=fp32", "deepspeed.zero_stage=0",
    "mlflow.enabled=false", "eval.knn_k=20", "eval.knn_t=0.1",
]  # fmt: skip


@dataclass
class SeedCurves:
    """kNN top-1 (%) at init and after each epoch, per arm, for one seed."""

    seed: int
    knn: dict[str, list[float]] = field(default_factory=dict)  # arm -> [init, epoch 1, ...]
    losses: dict[str, list[float]] = field(default_factory=dict)  # arm -> mean loss per epoch
    moved: dict[str, float] = field(default_factory=dict)  # arm -> |theta - theta_0| / |theta_0|, backbone


def backbone_vector(net: torch.nn.Module) -> torch.Tensor:
    """The backbone's parameters as one fp32 vector (on the CPU)."""
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in net.backbone.parameters()])


def relative_change(net: torch.nn.Module, start: torch.Tensor) -> float:
    """``|theta - theta_0| / |theta_0|`` of the backbone's parameters."""
    return float((backbone_vector(net) - start).norm() / start.norm())


# ----------------------------------------------------------------------------- the reference's data


def read_shard_images(shards: str | Path) -> tuple[list[Any], list[int]]:
    """Every ``(PIL image, label)`` of a shard set, in manifest order (decoded by PIL, RGB)."""
    from PIL import Image

    from unmix.pipeline.labels import parse_label
    from unmix.pipeline.shards.dali_index import split_name
    from unmix.pipeline.shards.manifest import read_manifest

    m = read_manifest(shards)
    images, labels = [], []
    for shard in m.shards:
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard.path) as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = split_name(info.name)  # the WebDataset key, as wds2idx and DALI split it
                data = tar.extractfile(info)
                members.setdefault(key, {})[ext] = data.read() if data is not None else b""
        for key, parts in members.items():
            if "jpg" not in parts or "cls" not in parts:
                raise ValueError(f"{shard.path}: sample {key!r} lacks a .jpg or .cls member")
            try:
                labels.append(parse_label(parts["cls"], m.num_classes))
            except ValueError as exc:
                raise ValueError(f"{shard.path}: sample {key!r}: {exc}") from None
            images.append(Image.open(io.BytesIO(parts["jpg"])).convert("RGB"))
    if len(images) != m.total:
        raise ValueError(f"{m.root}: read {len(images)} samples, the manifest lists {m.total}")
    return images, labels


class TwoViews(torch.utils.data.Dataset):
    """The authors' ``CIFAR10Pair``: two independently augmented views of each image."""

    def __init__(self, images: list[Any], view1: Any, view2: Any):
        self.images, self.view1, self.view2 = images, view1, view2

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[i]
        return self.view1(img), self.view2(img)  # 3xHxW each


# ------------------------------------------------------------------------------------------ the arms


def _reference_module(cfg: Any, net: torch.nn.Module, run: Any) -> torch.nn.Module:
    from unmix.training import fidelity

    name = cfg.method.name
    if name in ("moco_v2", "moco_v1"):
        c = cfg.method.moco
        return fidelity.AuthorsMoCo(
            fidelity.Embed(net), run.method.queue.queue.clone(), c.m, c.T, c.symmetric
        )
    if name == "byol":
        return fidelity.PaperBYOL(fidelity.Embed(net), fidelity.Embed(net, predictor=False))
    if name == "simclr":
        return fidelity.PaperSimCLR(fidelity.Embed(net, predictor=False), cfg.method.simclr.T)
    raise ValueError(f"method.name={name!r}: no reference step for it in unmix.training.fidelity")


def _reference_lr(cfg: Any, base_lr: float, step: int, epoch: int, spe: int, total: int) -> float:
    """The authors' schedule: MoCo's per-epoch cosine; BYOL/SimCLR: linear warm-up, then per-step cosine."""
    if cfg.method.name.startswith("moco"):
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / cfg.optim.epochs))
    warm = round(cfg.optim.warmup_epochs * spe)
    if step < warm:
        return base_lr * (step + 1) / warm
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def run_reference(
    cfg: Any, net: torch.nn.Module, run: Any, knn: Any, seed: int
) -> tuple[list[float], list[float]]:
    """Train ``net`` (a copy of the trainer's initial network) with the reference loop; return the kNN
    after each epoch and the mean loss of each epoch."""
    from unmix.pipeline.augment import get_recipe
    from unmix.training.fidelity import authors_mix

    recipe = get_recipe(cfg.data.recipe or _default_recipe(cfg))
    images, _ = read_shard_images(cfg.data.train if isinstance(cfg.data.train, str) else cfg.data.train[0])
    from unmix.pipeline.bench_pipeline import torchvision_view

    data = TwoViews(
        images, torchvision_view(recipe.view1, cfg.data.crop), torchvision_view(recipe.view2, cfg.data.crop)
    )
    g = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        data, batch_size=run.micro_batch, shuffle=True, drop_last=True, generator=g
    )
    ref = _reference_module(cfg, net, run)
    if hasattr(ref, "generator"):
        ref.generator = torch.Generator().manual_seed(seed)  # the key shuffle
    if cfg.optim.optimizer == "lars":  # the trainer's LARS (biases and norms excluded as configured)
        from unmix.training.lars import LARS, param_groups

        o = cfg.optim
        groups = param_groups(net, o.weight_decay, o.lars_exclude_bias_norm)
        opt: torch.optim.Optimizer = LARS(groups, 0.0, o.momentum, o.weight_decay, o.lars_eta)
    else:  # the authors': weight decay on every parameter
        opt = torch.optim.SGD(
            net.parameters(), lr=0.0, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
    rng = np.random.RandomState(seed)
    spe = min(len(loader), run.steps_per_epoch)
    total = spe * cfg.optim.epochs
    knn_curve, loss_curve, step = [], [], 0
    for epoch in range(cfg.optim.epochs):
        net.train()
        losses = []
        for i, (v1, v2) in enumerate(loader):
            if i >= spe:
                break
            lr = _reference_lr(cfg, run.base_lr, step, epoch, spe, total)
            for group in opt.param_groups:
                group["lr"] = lr
            mixed, lam, _, _ = authors_mix(v1, rng, prob=cfg.unmix.p_mixup, beta=cfg.unmix.alpha)
            if hasattr(ref, "m"):
                ref.m = run.method.momentum(step, total)
            loss = ref(v1, v2, mixed, lam)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if hasattr(ref, "update_target"):
                ref.update_target(run.method.momentum(step, total))
            losses.append(float(loss.detach()))
            step += 1
        loss_curve.append(statistics.fmean(losses))
        knn_curve.append(knn.evaluate(net.backbone).top1)
    return knn_curve, loss_curve


def run_trainer(run: Any, knn: Any) -> tuple[list[float], list[float]]:
    """``unmix train``'s loop body (``loop.train_step`` with the trainer's schedules) for the configured
    epochs; the kNN after each epoch and the mean loss of each epoch."""
    from unmix.training.loop import train_step
    from unmix.training.schedules import learning_rate

    cfg, spe = run.cfg, run.steps_per_epoch
    warm = round(cfg.optim.warmup_epochs * spe)
    milestones = tuple(m * spe for m in cfg.optim.milestones)
    knn_curve, loss_curve, step = [], [], 0
    for _ in range(cfg.optim.epochs):
        losses = []
        for i, batch in enumerate(run.loader):
            if i >= spe:
                continue  # drain the epoch
            lr = learning_rate(step, run.total_steps, run.base_lr, warm, cfg.optim.schedule, milestones)
            loss, _, _ = train_step(run, batch, step, lr, run.method.momentum(step, run.total_steps))
            losses.append(float(loss))
            step += 1
        loss_curve.append(statistics.fmean(losses))
        knn_curve.append(knn.evaluate(run.engine.module.backbone).top1)
    return knn_curve, loss_curve


def _default_recipe(cfg: Any) -> str:
    from unmix.training import methods

    return methods.spec(cfg.method.name).recipe


def seed_reference(seed: int) -> None:
    """Seed every stream the reference arm draws from: torch (torchvision's views, the head) and Python's
    ``random`` (the blur's sigma, drawn as the authors' MoCo v2 code draws it), so a seed's reference run is
    the same whatever ran before it in the process (unseeded, BYOL's reference moved from run to run)."""
    torch.manual_seed(seed)
    random.seed(seed)


def run_seed(cfg_path: str | None, overrides: list[str], seed: int) -> SeedCurves:
    """Both arms for one seed, from the same initial weights."""
    from unmix.training import loop
    from unmix.training.config import load_config
    from unmix.training.knn_monitor import KnnMonitor

    cfg = load_config(cfg_path, [*overrides, f"seed={seed}"])
    torch.manual_seed(seed)
    run = loop.setup(cfg)
    try:
        initial = copy.deepcopy(run.engine.module).float()  # before the trainer's first step
        knn = KnnMonitor(cfg, 0, 1, run.device, run.micro_batch)
        k0 = knn.evaluate(run.engine.module.backbone).top1
        out = SeedCurves(seed)
        start = backbone_vector(initial)
        seed_reference(seed)
        k, losses = run_reference(cfg, initial, run, knn, seed)
        out.knn["reference"], out.losses["reference"] = [k0, *k], losses
        out.moved["reference"] = relative_change(initial, start)
        k, losses = run_trainer(run, knn)
        out.knn["unmix"], out.losses["unmix"] = [k0, *k], losses
        out.moved["unmix"] = relative_change(run.engine.module, start)
        return out
    finally:
        run.engine.destroy()  # DeepSpeed's hooks and buffers go; the process group stays for the next seed


# ------------------------------------------------------------------------------------------ the table


def summarise(curves: list[SeedCurves]) -> dict[str, Any]:
    """Per epoch: median, min and max of each arm over seeds; the seed-paired difference (unmix -
    reference) with its 95 % interval; and the verdict at the last epoch."""
    from unmix.eval.compare import paired_gain

    epochs = len(curves[0].knn["unmix"])
    rows = []
    for e in range(epochs):
        row: dict[str, Any] = {"epoch": e}
        for arm in ("unmix", "reference"):
            v = [c.knn[arm][e] for c in curves]
            row[arm] = {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
        gain = paired_gain([c.knn["unmix"][e] - c.knn["reference"][e] for c in curves])
        row["diff"] = {k: gain[k] for k in ("n", "mean", "lo", "hi")}
        rows.append(row)
    last = rows[-1]
    u, r = last["unmix"], last["reference"]
    agree = r["min"] <= u["median"] <= r["max"] and u["min"] <= r["median"] <= u["max"]
    d = last["diff"]
    holds_zero = None if d["lo"] is None else d["lo"] <= 0 <= d["hi"]
    return {
        "rows": rows,
        "agree": agree,
        "interval_holds_zero": holds_zero,
        "seeds": [c.seed for c in curves],
    }


def format_table(summary: dict[str, Any], title: str) -> str:
    """The summary as a Markdown table plus the verdict line."""
    lines = [
        title,
        "",
        "| epoch | unmix median (min-max) | reference median (min-max) | unmix - reference, mean [95 % CI] |",
        "|---|---|---|---|",
    ]
    for row in summary["rows"]:
        cells = [str(row["epoch"]) if row["epoch"] else "init"]
        for arm in ("unmix", "reference"):
            a = row[arm]
            cells.append(f"{a['median']:.1f} ({a['min']:.1f}-{a['max']:.1f})")
        d = row["diff"]
        if row["epoch"] == 0:
            cells.append("0 (same weights)")
        elif d["lo"] is None:
            cells.append(f"{d['mean']:+.1f} (1 seed)")
        else:
            cells.append(f"{d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}]")
        lines.append("| " + " | ".join(cells) + " |")
    n = len(summary["seeds"])
    last = summary["rows"][-1]
    u, r, d = last["unmix"], last["reference"], last["diff"]
    ranges = (
        "each arm's median lies inside the other's range"
        if summary["agree"]
        else f"the medians do NOT lie inside each other's range (unmix {u['median']:.1f} in "
        f"{r['min']:.1f}-{r['max']:.1f}? reference {r['median']:.1f} in {u['min']:.1f}-{u['max']:.1f}?)"
    )
    if summary["interval_holds_zero"] is None:
        paired = "one seed: no interval"
    else:
        paired = f"the seed-paired difference {d['mean']:+.1f} [{d['lo']:+.1f}, {d['hi']:+.1f}] " + (
            "holds 0 (within noise)" if summary["interval_holds_zero"] else "excludes 0 (a real difference)"
        )
    lines += ["", f"last epoch, {n} seed(s): {ranges}; {paired}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the command


def main(args: argparse.Namespace) -> int:
    """``unmix bench fidelity`` (its options: :mod:`unmix.eval.cli`); returns the exit status."""
    if args.seeds < 1 or args.epochs < 1:
        print("unmix bench fidelity: error: --seeds and --epochs must be >= 1", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="unmix-fidelity-") as tmp:
        from unmix.pipeline.shards.sample import sample_or_given

        try:
            data = sample_or_given(args.data, "digits", tmp)
        except ValueError as exc:
            print(f"unmix bench fidelity: error: {exc}", file=sys.stderr)
            return 2
        report: dict[str, Any] = {}
        for method in args.method:
            overrides = [] if args.config else [*COMMON_OVERRIDES, *METHOD_OVERRIDES[method]]
            overrides += [
                f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"optim.epochs={args.epochs}",
                f"output_dir={Path(tmp) / 'runs' / method}", *args.overrides,
            ]  # fmt: skip
            curves = []
            for seed in range(args.seeds):
                c = run_seed(args.config, overrides, seed)
                print(
                    f"[{method} seed {seed}] kNN unmix {' '.join(f'{x:.1f}' for x in c.knn['unmix'])} | "
                    f"reference {' '.join(f'{x:.1f}' for x in c.knn['reference'])}",
                    flush=True,
                )
                curves.append(c)
            summary = summarise(curves)
            print(
                format_table(summary, f"\n{method} + Un-Mix: kNN top-1 %, {args.seeds} seed(s)"), flush=True
            )
            report[method] = {"summary": summary, "curves": [c.__dict__ for c in curves]}
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1))
    return 0
