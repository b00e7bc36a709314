"""The ``unmix linear`` and ``unmix knn`` jobs: backbone in, accuracy out (stdout, JSON, MLflow).

Both load the backbone (``backbone.pt`` or a bare torchvision state dict, or a random initialisation),
join the process group from the environment, evaluate, check that the backbone did not change, and
report from rank 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eval import distributed
from eval.features import extract_features, freeze, state_fingerprint
from eval.knn import knn_evaluate
from eval.linear import linear_eval
from eval.protocols import DEFAULT_CROP, LinearProtocol, as_params, with_crop
from eval.tracking import EvalTracker, resolve_experiment, resolve_tracking_uri


@dataclass
class BackboneSpec:
    """Where the backbone comes from: a file (``path``, optional ``arch``) or ``random_init`` = ARCH."""

    path: str | None = None
    arch: str | None = None
    random_init: str | None = None
    width: int = 64  # base width of a random-init backbone

    @property
    def label(self) -> str:
        return f"random_init:{self.random_init}" if self.random_init else str(self.path)


def load(spec: BackboneSpec, crop: int | None, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The frozen backbone and its metadata (``random_init`` = ARCH for an untrained one).

    A random-init backbone is built for ``crop`` (default 224; <= 64 gives the CIFAR stem).
    """
    from training.backbones import build_backbone, load_backbone

    if spec.random_init:
        torch.manual_seed(seed)
        crop = crop or DEFAULT_CROP
        net = build_backbone(spec.random_init, crop=crop, width=spec.width)
        meta = {
            "crop": crop,
            "arch": spec.random_init,
            "random_init": True,
            "small_images": net.small_images,
            "width": net.width,
            "feature_dim": net.feature_dim,
        }
    else:
        if spec.path is None:
            raise ValueError("give --backbone PATH or --random-init ARCH")
        net, meta = load_backbone(spec.path, arch=spec.arch)
    return freeze(net), meta


def num_classes_of(train_dir: str) -> int:
    """Number of classes in the shard set's manifest."""
    from pipeline.shards import read_manifest

    return read_manifest(train_dir).num_classes


def check_val_count(val_dir: str, counted: int) -> None:
    """Every val sample must be counted exactly once over all ranks: compare with the manifest."""
    from pipeline.shards import read_manifest

    total = read_manifest(val_dir).total
    if counted != total:
        raise RuntimeError(f"{val_dir}: evaluated {counted} samples but the manifest lists {total}")


def default_loader() -> Callable[..., Any]:
    from pipeline import build_eval_loader

    return build_eval_loader


def _tracker(
    kind: str,
    spec: BackboneSpec,
    meta: dict[str, Any],
    ctx: distributed.DistContext,
    track: bool,
    tracking_uri: str | None,
    experiment: str | None,
    params: dict[str, Any],
) -> EvalTracker:
    pretrain_run_id = None if spec.random_init else meta.get("mlflow_run_id")
    tags = {
        "unmix.kind": "random_init" if spec.random_init else f"{kind}_eval",
        "unmix.eval": kind,
        "unmix.backbone": spec.label,
    }
    if spec.random_init:
        tags["random_init"] = spec.random_init
    if pretrain_run_id:
        tags["unmix.pretrain_run_id"] = pretrain_run_id
    for key in ("method", "unmix"):
        if key in meta:
            tags[key] = str(meta[key]).lower() if key != "unmix" else ("on" if meta[key] else "off")
    name = f"{kind}-{spec.random_init or meta.get('method', 'backbone')}"
    return EvalTracker(
        enabled=track and ctx.is_main,
        tracking_uri=resolve_tracking_uri(tracking_uri, meta),
        experiment=resolve_experiment(experiment, meta),
        run_name=name,
        tags=tags,
        params={
            "model.arch": meta.get("arch"),
            "backbone": spec.label,
            "world_size": ctx.world_size,
            **params,
        },
        pretrain_run_id=pretrain_run_id,
    )


def _check_unchanged(backbone: nn.Module, before: str) -> None:
    if state_fingerprint(backbone) != before:
        raise RuntimeError("the backbone changed during evaluation (parameters or BatchNorm statistics)")


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def run_linear(
    spec: BackboneSpec,
    train_dir: str,
    val_dir: str,
    proto: LinearProtocol,
    json_path: str | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    make_loader: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Linear evaluation job; returns the JSON payload (identical on every rank)."""
    ctx = distributed.setup(proto.device)
    tracker = None
    try:
        backbone, meta = load(spec, proto.crop, proto.seed)
        proto = with_crop(proto, meta)
        before = state_fingerprint(backbone)
        num_classes = num_classes_of(train_dir)
        tracker = _tracker(
            "linear",
            spec,
            meta,
            ctx,
            track,
            tracking_uri,
            experiment,
            {**as_params(proto), "train": train_dir, "val": val_dir},
        )

        def on_epoch(rec: dict[str, float]) -> None:
            step = int(rec["epoch"])
            tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=step)
            if ctx.is_main:
                val = f"  val top-1 {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
                print(
                    f"linear epoch {step}/{proto.epochs}  loss {rec['train_loss']:.4f}  "
                    f"lr {rec['lr']:.4g}{val}",
                    flush=True,
                )

        result = linear_eval(
            backbone, num_classes, proto, ctx, make_loader or default_loader(), train_dir, val_dir, on_epoch
        )
        _check_unchanged(backbone, before)
        check_val_count(val_dir, result.val_samples)
        payload = {
            "top1": result.top1,
            "top5": result.top5,
            "epochs": result.epochs,
            "backbone": spec.label,
            "run_id": tracker.run_id,
            "pretrain_run_id": tracker.pretrain_run_id,
            "protocol": proto.protocol,
            "features": proto.features,
            "crop": proto.crop,
            "val_samples": result.val_samples,
            "arch": meta.get("arch"),
        }
        tracker.log_metrics({"linear_top1": result.top1, "linear_top5": result.top5})
        tracker.log_on_pretrain_run({"linear_top1": result.top1, "linear_top5": result.top5})
        tracker.finish()
        if ctx.is_main:
            print(
                f"linear top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
                f"({result.val_samples} val images, {result.epochs} epochs, {spec.label})",
                flush=True,
            )
            _write_json(json_path, payload)
        return payload
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        distributed.teardown(ctx)


def run_knn(
    spec: BackboneSpec,
    train_dir: str,
    val_dir: str,
    proto: LinearProtocol,
    k: int = 200,
    t: float = 0.1,
    json_path: str | None = None,
    track: bool = True,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    make_loader: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Weighted-kNN evaluation job (features with the val transform); returns the JSON payload."""
    ctx = distributed.setup(proto.device)
    tracker = None
    try:
        backbone, meta = load(spec, proto.crop, proto.seed)
        proto = with_crop(proto, meta)
        backbone.to(ctx.device)
        before = state_fingerprint(backbone)
        num_classes = num_classes_of(train_dir)
        make_loader = make_loader or default_loader()
        tracker = _tracker(
            "knn",
            spec,
            meta,
            ctx,
            track,
            tracking_uri,
            experiment,
            {
                "knn.k": k,
                "knn.t": t,
                "batch_size": proto.batch_size,
                "data.crop": proto.crop,
                "device": proto.device,
                "train": train_dir,
                "val": val_dir,
            },
        )
        local_batch = max(1, proto.batch_size // ctx.world_size)

        def features(shards: str) -> tuple[torch.Tensor, torch.Tensor]:
            loader = make_loader(
                shards,
                batch_size=local_batch,
                split="val",
                crop=proto.crop,
                device=proto.device,
                shard_id=ctx.rank,
                num_shards=ctx.world_size,
                seed=proto.seed,
                num_threads=proto.num_threads,
            )
            return extract_features(backbone, loader, ctx.device)

        f_train, y_train = features(train_dir)
        f_val, y_val = features(val_dir)
        result = knn_evaluate(f_val, y_val, f_train, y_train, num_classes, k=k, t=t)
        _check_unchanged(backbone, before)
        check_val_count(val_dir, result.total)
        payload = {
            "top1": result.top1,
            "top5": result.top5,
            "k": k,
            "t": t,
            "backbone": spec.label,
            "run_id": tracker.run_id,
            "pretrain_run_id": tracker.pretrain_run_id,
            "val_samples": result.total,
            "arch": meta.get("arch"),
        }
        tracker.log_metrics({"knn_top1": result.top1, "knn_top5": result.top5})
        tracker.log_on_pretrain_run({"knn_top1": result.top1, "knn_top5": result.top5})
        tracker.finish()
        if ctx.is_main:
            print(
                f"knn top-1 {result.top1:.2f}%  (k={k}, t={t}, {result.total} val images, {spec.label})",
                flush=True,
            )
            _write_json(json_path, payload)
        return payload
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        distributed.teardown(ctx)


def fail(command: str, exc: BaseException) -> int:
    """Print a one-line error for ``command`` and return the exit status 2."""
    print(f"unmix {command}: error: {exc}", file=sys.stderr)
    return 2
