"""``unmix bench probe``: every linear probe on the same cached features, and the reference probe's speed.

:func:`accuracy_table` (part 1) and :func:`speed` (part 2); what each measures, and the options, are the
command's description in :mod:`unmix.eval.cli` (``unmix bench probe --help``), which registers it.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

SAMPLES_CROP = {"digits": 32, "shifted-digits": 16, "photos": 64}  # the crop each sample is trained at


def _features(net, train: str, val: str, crop: int, device: torch.device):
    from unmix.eval.features import extract_features, freeze
    from unmix.pipeline import build_eval_loader

    freeze(net).to(device)
    out = []
    for shards in (train, val):
        loader = build_eval_loader(
            shards, batch_size=256, split="val", crop=crop, device="cpu", num_threads=2
        )
        out.extend(extract_features(net, loader, device))
    return out


def _sgd_seeds(proto, f_tr, y_tr, f_va, y_va, classes: int, seeds: int) -> str:
    """``_sgd`` at seed 0, or over seeds ``0..seeds-1``: "mean (min-max)" (a stopped seed: "stopped")."""
    runs = [_sgd(dataclasses.replace(proto, seed=s), f_tr, y_tr, f_va, y_va, classes) for s in range(seeds)]
    if seeds == 1 or "stopped" in runs:
        return runs[0] if seeds == 1 else "stopped"
    v = [float(r) for r in runs]
    return f"{np.mean(v):.2f} ({min(v):.2f}-{max(v):.2f})"


def _sgd(proto, f_tr, y_tr, f_va, y_va, classes: int) -> str:
    from unmix.eval.divergence import ProbeDivergedError
    from unmix.eval.linear import sgd_probe

    try:
        return f"{sgd_probe(f_tr, y_tr, f_va, y_va, classes, proto).top1:.2f}"
    except ProbeDivergedError:
        return "stopped"


def _augmented(proto, net, train: str, val: str, crop: int, classes: int, device) -> str:
    from unmix.eval.distributed import DistContext
    from unmix.eval.divergence import ProbeDivergedError
    from unmix.eval.linear import linear_eval
    from unmix.pipeline import build_eval_loader

    proto = dataclasses.replace(proto, crop=crop, device="cpu", num_threads=2, features="augmented")
    ctx = DistContext.single(device)
    try:
        return f"{linear_eval(net, classes, proto, ctx, build_eval_loader, train, val).top1:.2f}"
    except ProbeDivergedError:
        return "stopped"


class FeatureSet(NamedTuple):
    """One sample's cached features of one backbone, and what made them."""

    sample: str
    name: str  # the backbone's row label
    net: torch.nn.Module
    train: str  # shard directories
    val: str
    crop: int
    classes: int
    f_tr: torch.Tensor  # [N, D]
    y_tr: torch.Tensor  # [N]
    f_va: torch.Tensor
    y_va: torch.Tensor


def _feature_sets(
    samples: list[str], backbones: list[str], device: torch.device, tmp: str
) -> Iterator[FeatureSet]:
    """Each built-in sample (written under ``tmp``) through each backbone: a random-init ResNet-10 (width
    32), the raw pixels, and each ``backbones`` file trained at the sample's crop."""
    from unmix.eval.features import PixelFeatures
    from unmix.pipeline.shards.sample import write_sample
    from unmix.training.backbone_file import load_backbone
    from unmix.training.backbones import build_backbone

    for sample in samples:
        manifests = write_sample(sample, Path(tmp) / sample)
        train, val = str(Path(tmp) / sample / "train"), str(Path(tmp) / sample / "val")
        classes, crop = manifests[0].num_classes, SAMPLES_CROP[sample]
        nets = {}
        torch.manual_seed(0)
        nets["random-init resnet10 w32"] = build_backbone("resnet10", crop=crop, width=32)
        nets["raw pixels"] = PixelFeatures(crop)
        for path in backbones:
            net, meta = load_backbone(path)
            if int(meta.crop or crop) == crop:
                nets[f"{meta.method or 'backbone'} {meta.epochs or '?'} ep ({Path(path).name})"] = net
        for name, net in nets.items():
            features = _features(net, train, val, crop, device)
            yield FeatureSet(sample, name, net, train, val, crop, classes, *features)


def _table_header(cols: list[str]) -> list[str]:
    """A markdown table's header and rule lines."""
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def accuracy_table(
    samples: list[str], backbones: list[str], augmented: bool, device: torch.device, seeds: int = 1
) -> str:
    """Markdown table: top-1 (%) of every probe on each sample's cached features of each backbone; the
    moco/byol defaults over ``seeds`` seeds (mean (min-max)) when ``seeds > 1``."""
    from sklearn.linear_model import LogisticRegression

    from unmix.eval.logreg import Standardiser, logreg_eval
    from unmix.eval.protocols import byol_protocol, moco_protocol

    cols = ["logreg", "moco", "byol", "moco none", "byol none", "sklearn"]
    if augmented:
        cols += ["moco aug", "byol aug"]
    lines = _table_header(["sample", "backbone", *cols, "logreg l2"])
    with tempfile.TemporaryDirectory() as tmp:
        for fs in _feature_sets(samples, backbones, device, tmp):
            data = (fs.f_tr, fs.y_tr, fs.f_va, fs.y_va)
            ref = logreg_eval(*data, fs.classes, seed=0)
            std = Standardiser.fit(fs.f_tr)
            sk = LogisticRegression(C=1.0 / (ref.l2 * len(fs.y_tr)), max_iter=5000, tol=1e-6)
            sk.fit(std(fs.f_tr).double().cpu().numpy(), fs.y_tr.cpu().numpy())
            sk_top1 = 100.0 * float(
                np.mean(sk.predict(std(fs.f_va).double().cpu().numpy()) == fs.y_va.cpu().numpy())
            )
            row = [f"{ref.top1:.2f}"]
            for make in (moco_protocol, byol_protocol):
                row.append(_sgd_seeds(make(), *data, fs.classes, seeds))
            for make in (moco_protocol, byol_protocol):
                row.append(_sgd(make("none"), *data, fs.classes))
            row.append(f"{sk_top1:.2f}")
            if augmented:
                for make in (moco_protocol, byol_protocol):
                    row.append(_augmented(make(), fs.net, fs.train, fs.val, fs.crop, fs.classes, device))
            lines.append(f"| {fs.sample} | {fs.name} | " + " | ".join(row) + f" | {ref.l2:.0e} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


SELECTION_RULES = ("fixed", "holdout top-1", "holdout loss", "best on val")


def pair_scores(proto, f_tr, y_tr, f_va, y_va, classes: int) -> list[dict[str, Any]]:
    """Every (lr, weight_decay) of ``proto``'s grid, scored as the search scores it (:func:`choose_hparams`:
    trained on train less the held-out part, ``holdout_top1``, ``holdout_loss``) and refit on all of train
    (scored on val: ``val``); None where the guard stopped it."""
    from unmix.eval.distributed import DistContext
    from unmix.eval.divergence import ProbeDivergedError
    from unmix.eval.linear import choose_hparams, sgd_probe
    from unmix.eval.protocols import fixed

    try:
        _, held = choose_hparams(f_tr, y_tr, classes, proto, DistContext.single(f_tr.device))
    except ProbeDivergedError:  # the guard stopped every pair
        held = dict.fromkeys(proto.candidates())
    rows = []
    for (lr, wd), score in held.items():
        row: dict[str, Any] = {"lr": lr, "weight_decay": wd, "holdout_top1": None, "holdout_loss": None}
        if score is not None:
            row.update(holdout_top1=score.top1, holdout_loss=score.loss)
        try:
            row["val"] = sgd_probe(f_tr, y_tr, f_va, y_va, classes, fixed(proto, lr=lr, weight_decay=wd)).top1
        except ProbeDivergedError:
            row["val"] = None
        rows.append(row)
    return rows


def pick(rows: list[dict[str, Any]], rule: str, fixed_pair: tuple[float, float]) -> dict[str, Any]:
    """The row a selection rule picks: ``fixed`` (``fixed_pair``), the highest ``holdout top-1`` (ties: the
    larger lr, then decay), the lowest ``holdout loss`` (the search's rule, :func:`lowest_loss_pair`), or
    the ``best on val`` (the ceiling of any rule on this grid)."""
    from unmix.eval.linear import lowest_loss_pair

    trained = [r for r in rows if r["holdout_loss"] is not None]
    if rule == "fixed":
        return next(r for r in rows if (r["lr"], r["weight_decay"]) == fixed_pair)
    if rule == "holdout top-1":
        return max(trained, key=lambda r: (r["holdout_top1"], r["lr"], r["weight_decay"]))
    if rule == "holdout loss":
        best = lowest_loss_pair({(r["lr"], r["weight_decay"]): r["holdout_loss"] for r in trained})
        return next(r for r in trained if (r["lr"], r["weight_decay"]) == best)
    if rule == "best on val":
        return max((r for r in rows if r["val"] is not None), key=lambda r: r["val"])
    raise ValueError(f"unknown rule {rule!r}; choose from {', '.join(SELECTION_RULES)}")


def _gaps(gaps: list[float | None]) -> str:
    """``mean (worst)`` of the gaps to logreg, or "stopped" when any seed's pick was stopped."""
    if any(g is None for g in gaps):
        return "stopped"
    return f"{np.mean(gaps):+.2f} ({min(gaps):+.2f})"


def selection_table(samples: list[str], backbones: list[str], device: torch.device, seeds: int) -> str:
    """Markdown table: for each sample, backbone and SGD protocol, the val top-1 minus logreg's of the pair
    each selection rule picks (:data:`SELECTION_RULES`), mean over seeds ``0..seeds-1`` (worst seed)."""
    from unmix.eval.logreg import logreg_eval
    from unmix.eval.protocols import BN_HEAD_LR, BN_HEAD_WEIGHT_DECAY, byol_protocol, moco_protocol

    lines = _table_header(["sample", "backbone", "logreg", "protocol", *SELECTION_RULES])
    with tempfile.TemporaryDirectory() as tmp:
        for fs in _feature_sets(samples, backbones, device, tmp):
            data = (fs.f_tr, fs.y_tr, fs.f_va, fs.y_va)
            ref = logreg_eval(*data, fs.classes, seed=0).top1
            for make in (moco_protocol, byol_protocol):
                gaps: dict[str, list[float | None]] = {rule: [] for rule in SELECTION_RULES}
                for seed in range(seeds):
                    rows = pair_scores(dataclasses.replace(make(), seed=seed), *data, fs.classes)
                    for rule in SELECTION_RULES:
                        val = pick(rows, rule, (BN_HEAD_LR, BN_HEAD_WEIGHT_DECAY))["val"]
                        gaps[rule].append(None if val is None else val - ref)
                cells = " | ".join(_gaps(gaps[rule]) for rule in SELECTION_RULES)
                lines.append(f"| {fs.sample} | {fs.name} | {ref:.2f} | {make().protocol} | {cells} |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def speed(rows: int, target_rows: int, dim: int, classes: int, device: torch.device, repeats: int = 3) -> str:
    """Seconds per full-data loss + gradient of logreg's objective on synthetic features; the projection."""
    from unmix.eval.logreg import Objective, Standardiser

    g = torch.Generator().manual_seed(0)
    f = torch.randn(rows, dim, generator=g).to(device)
    y = torch.randint(0, classes, (rows,), generator=g).to(device)
    obj = Objective(f, y, classes, Standardiser.fit(f), l2=1e-4)
    theta = torch.zeros(classes, dim + 1, device=device)
    obj(theta)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        obj(theta)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    per_eval = float(np.median(times))
    scaled = per_eval * target_rows / rows
    how = (
        "measured" if rows == target_rows else f"measured on {rows:,} rows, scaled x{target_rows / rows:.1f}"
    )
    return (
        f"logreg objective (loss + gradient), {target_rows:,} x {dim} features, {classes} classes, "
        f"{device.type} ({torch.get_num_threads()} threads): {scaled:.2f} s per evaluation ({how}; "
        f"median of {repeats}: {per_eval:.3f} s on {rows:,} rows)\n"
        f"projected grid + refit: 1,000 evaluations -> {scaled * 1000 / 60:.1f} min, "
        f"3,000 -> {scaled * 3000 / 60:.1f} min"
    )


def main(args: argparse.Namespace) -> int:
    """Run ``unmix bench probe`` with its parsed arguments; returns the exit status."""
    device = torch.device("cuda" if args.device == "gpu" else "cpu")
    if args.device == "gpu" and not torch.cuda.is_available():
        print("unmix bench probe: error: --device gpu: no CUDA device is visible", file=sys.stderr)
        return 2
    if args.selection:
        print(selection_table(args.samples, args.backbone, device, args.seeds))
    elif not args.skip_accuracy:
        print(accuracy_table(args.samples, args.backbone, args.augmented, device, args.seeds))
    if not args.skip_speed:
        print(speed(args.speed_rows, args.target_rows, args.dim, args.classes, device))
    return 0
