"""The ``unmix linear`` and ``unmix knn`` jobs: backbone in, accuracy out (stdout, JSON, MLflow).

Both load the backbone (``backbone.pt`` or a bare torchvision state dict, or a random initialisation),
join the process group from the environment, evaluate, check that the backbone did not change, and
report from rank 0.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unmix.eval import distributed
from unmix.eval.eval_runs import EvalTracker, resolve_experiment, resolve_tracking_uri
from unmix.eval.features import PixelFeatures, extract_features, freeze, state_fingerprint
from unmix.eval.linear import cached_features, linear_eval
from unmix.eval.logreg import logreg_eval
from unmix.eval.protocols import DEFAULT_CROP, LinearProtocol, as_params, with_crop
from unmix.training.atomic import check_writable, write_text
from unmix.training.backbone_file import BackboneMeta
from unmix.training.knn import knn_evaluate


@dataclass
class BackboneSpec:
    """Where the backbone comes from: a file (``path``, optional ``arch``), ``random_init`` = ARCH, or
    ``pixels`` (the flattened, resized and normalised images themselves: the pixel floor)."""

    path: str | None = None
    arch: str | None = None
    random_init: str | None = None
    width: int = 64  # base width of a random-init backbone
    pixels: bool = False

    @property
    def label(self) -> str:
        if self.pixels:
            return "pixels"
        return f"random_init:{self.random_init}" if self.random_init else str(self.path)

    @property
    def floor_kind(self) -> str | None:
        """``unmix.kind`` of a floor evaluation (``random_init`` | ``pixels``); None for a backbone."""
        return "pixels" if self.pixels else ("random_init" if self.random_init else None)


def load(spec: BackboneSpec, crop: int | None, seed: int) -> tuple[nn.Module, BackboneMeta]:
    """The frozen backbone and its metadata (``random_init`` = ARCH for an untrained one).

    A random-init backbone is built for ``crop`` (default 224; <= 64 gives the CIFAR stem); ``pixels``
    is :class:`~unmix.eval.features.PixelFeatures` at ``crop``.
    """
    from unmix.training.backbone_file import load_backbone
    from unmix.training.backbones import build_backbone

    if spec.pixels:
        crop = crop or DEFAULT_CROP
        pix = PixelFeatures(crop)
        return freeze(pix), BackboneMeta("pixels", None, None, pix.feature_dim, crop=crop)
    if spec.random_init:
        torch.manual_seed(seed)
        crop = crop or DEFAULT_CROP
        net = build_backbone(spec.random_init, crop=crop, width=spec.width)
        meta = BackboneMeta.of(net, crop=crop)
    else:
        if spec.path is None:
            raise ValueError("give --backbone PATH or --random-init ARCH")
        net, meta = load_backbone(spec.path, arch=spec.arch)
    return freeze(net), meta


def num_classes_of(train_dir: str) -> int:
    """Number of classes in the shard set's manifest."""
    from unmix.pipeline.shards.manifest import read_manifest

    return read_manifest(train_dir).num_classes


def check_val_count(val_dir: str, counted: int) -> None:
    """Every val sample must be counted exactly once over all ranks: compare with the manifest."""
    from unmix.pipeline.shards.manifest import read_manifest

    total = read_manifest(val_dir).total
    if counted != total:
        raise RuntimeError(f"{val_dir}: evaluated {counted} samples but the manifest lists {total}")


def default_loader() -> Callable[..., Any]:
    from unmix.pipeline import build_eval_loader

    return build_eval_loader


def _tracker(
    kind: str,
    spec: BackboneSpec,
    meta: BackboneMeta,
    ctx: distributed.DistContext,
    track: bool,
    tracking_uri: str | None,
    experiment: str | None,
    params: dict[str, Any],
    protocol: str,
) -> EvalTracker:
    pretrain_run_id = None if spec.floor_kind else meta.mlflow_run_id
    tags = {
        "unmix.kind": spec.floor_kind or f"{kind}_eval",
        "unmix.eval": kind,
        "unmix.protocol": protocol,  # logreg | moco | byol (linear), knn
        "unmix.backbone": spec.label,
    }
    if spec.random_init:
        tags["random_init"] = spec.random_init
    if pretrain_run_id:
        tags["unmix.pretrain_run_id"] = pretrain_run_id
    if meta.method is not None:
        tags["method"] = meta.method.lower()
    if meta.unmix is not None:
        tags["unmix"] = "on" if meta.unmix else "off"
    source = spec.random_init or ("pixels" if spec.pixels else meta.method or "backbone")
    name = f"{kind}-{protocol}-{source}" if kind == "linear" else f"{kind}-{source}"
    return EvalTracker(
        enabled=track and ctx.is_main,
        tracking_uri=resolve_tracking_uri(
            tracking_uri, meta.mlflow_tracking_uri, announce=track and ctx.is_main
        ),
        experiment=resolve_experiment(experiment, meta.mlflow_experiment),
        run_name=name,
        tags=tags,
        params={
            "model.arch": meta.arch,
            "backbone": spec.label,
            "world_size": ctx.world_size,
            **params,
        },
        pretrain_run_id=pretrain_run_id,
    )


def _check_json_path(path: str | None) -> None:
    """Before any work: the directory of ``--json`` must be writable (WriteError naming it otherwise)."""
    if path:
        check_writable(Path(path).parent, "--json directory")


def _write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:  # temporary file + rename: a reader never sees half a result
        write_text(Path(path), json.dumps(payload, indent=2) + "\n")


@dataclass
class EvalJob:
    """One evaluation in progress: the process group, the frozen backbone and its MLflow run."""

    kind: str  # "linear" | "knn": the prefix of the metrics logged
    spec: BackboneSpec
    ctx: distributed.DistContext
    backbone: nn.Module
    meta: BackboneMeta
    proto: LinearProtocol  # crop resolved from the backbone's metadata
    num_classes: int
    tracker: EvalTracker
    fingerprint: str  # of the backbone before the evaluation

    def report(
        self, top1: float, top5: float, val_dir: str, val_samples: int, payload: dict, json_path: str | None
    ) -> dict[str, Any]:
        """Check the backbone and the val count, log, print and write the result; returns the payload."""
        if state_fingerprint(self.backbone) != self.fingerprint:
            raise RuntimeError("the backbone changed during evaluation (parameters or BatchNorm statistics)")
        check_val_count(val_dir, val_samples)
        payload = {
            "top1": top1,
            "top5": top5,
            **payload,
            "backbone": self.spec.label,
            "run_id": self.tracker.run_id,
            "pretrain_run_id": self.tracker.pretrain_run_id,
            "val_samples": val_samples,
            "arch": self.meta.arch,
        }
        metrics = {f"{self.kind}_top1": top1, f"{self.kind}_top5": top5}
        self.tracker.log_metrics(metrics)
        if self.kind == "linear":  # also under the protocol's name: several probes may report on one run
            metrics.update(
                {f"linear_{self.proto.protocol}_top1": top1, f"linear_{self.proto.protocol}_top5": top5}
            )
        self.tracker.log_on_pretrain_run(metrics)
        self.tracker.finish()
        if self.ctx.is_main:
            _write_json(json_path, payload)
        return payload


@contextmanager
def eval_job(
    kind: str,
    spec: BackboneSpec,
    train_dir: str,
    val_dir: str,
    proto: LinearProtocol,
    params: Callable[[LinearProtocol], dict[str, Any]],
    track: bool,
    tracking_uri: str | None,
    experiment: str | None,
) -> Iterator[EvalJob]:
    """Join the process group, load the backbone, open the MLflow run (``params(proto)`` + data paths).

    The run is marked FAILED when the body raises; the process group is left in every case.
    """
    ctx = distributed.setup(proto.device)
    tracker = None
    failed = False
    try:
        backbone, meta = load(spec, proto.crop, proto.seed)
        proto = with_crop(proto, meta.crop)
        fingerprint = state_fingerprint(backbone)
        num_classes = num_classes_of(train_dir)
        run_params = {**params(proto), "train": train_dir, "val": val_dir}
        protocol = proto.protocol if kind == "linear" else kind
        tracker = _tracker(kind, spec, meta, ctx, track, tracking_uri, experiment, run_params, protocol)
        yield EvalJob(kind, spec, ctx, backbone, meta, proto, num_classes, tracker, fingerprint)
    except BaseException:
        failed = True
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    finally:
        distributed.teardown(ctx, wait=not failed)


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
    _check_json_path(json_path)
    with eval_job(
        "linear", spec, train_dir, val_dir, proto, as_params, track, tracking_uri, experiment
    ) as job:
        proto = job.proto

        def on_epoch(rec: dict[str, float]) -> None:
            step = int(rec["epoch"])
            job.tracker.log_metrics({k: v for k, v in rec.items() if k != "epoch"}, step=step)
            if job.ctx.is_main:
                val = f"  val top-1 {rec['val_top1']:.2f}%" if "val_top1" in rec else ""
                print(
                    f"linear epoch {step}/{proto.epochs}  loss {rec['train_loss']:.4f}  "
                    f"lr {rec['lr']:.4g}{val}",
                    flush=True,
                )

        loader = make_loader or default_loader()
        if proto.protocol == "logreg":
            return _run_logreg(job, loader, train_dir, val_dir, json_path)
        result = linear_eval(
            job.backbone, job.num_classes, proto, job.ctx, loader, train_dir, val_dir, on_epoch
        )
        if result.search:  # (lr, weight_decay) chosen on the held-out part of train (cached features)
            chosen = {"lr_chosen": float(result.lr), "weight_decay_chosen": float(result.weight_decay)}
            job.tracker.log_metrics(chosen)
            for i, ((lr, wd), score) in enumerate(result.search.items()):
                if score is not None:
                    metrics = {"search_lr": lr, "search_weight_decay": wd, "search_holdout_top1": score.top1}
                    job.tracker.log_metrics({**metrics, "search_holdout_loss": score.loss}, step=i)
                if job.ctx.is_main:
                    held = (
                        "stopped by the guard"
                        if score is None
                        else f"held-out loss {score.loss:.4f}  top-1 {score.top1:.2f}%"
                    )
                    print(f"sgd lr {lr:g}  weight_decay {wd:g}  {held}", flush=True)
        extra = {
            "epochs": result.epochs,
            "protocol": proto.protocol,
            "head_norm": proto.head_norm,
            "features": proto.features,
            "crop": proto.crop,
            "lr": result.lr,
            "weight_decay": result.weight_decay,
            "search": [  # empty: lr and weight_decay were fixed; holdout_*: None where the guard stopped it
                {
                    "lr": lr,
                    "weight_decay": wd,
                    "holdout_loss": None if score is None else score.loss,
                    "holdout_top1": None if score is None else score.top1,
                }
                for (lr, wd), score in result.search.items()
            ],
        }
        payload = job.report(result.top1, result.top5, val_dir, result.val_samples, extra, json_path)
        if job.ctx.is_main:
            how = " chosen on held-out train" if result.search else ""
            print(
                f"linear top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  "
                f"(protocol={proto.protocol}, head_norm={proto.head_norm}, lr {result.lr:g}, "
                f"weight_decay {result.weight_decay:g}{how}, "
                f"{result.val_samples} val images, "
                f"{result.epochs} epochs, {spec.label})",
                flush=True,
            )
        return payload


def _run_logreg(
    job: EvalJob, make_loader: Callable[..., Any], train_dir: str, val_dir: str, json_path: str | None
) -> dict[str, Any]:
    """``protocol=logreg``: cached features, the L-BFGS reference probe (:mod:`unmix.eval.logreg`)."""
    proto, ctx = job.proto, job.ctx
    f_train, y_train, f_val, y_val = cached_features(
        job.backbone, proto, ctx, make_loader, train_dir, val_dir
    )
    fits = 0

    def on_fit(rec: dict[str, float]) -> None:
        nonlocal fits
        fits += 1
        if "holdout_top1" in rec:
            job.tracker.log_metrics(
                {"logreg_l2": rec["l2"], "logreg_holdout_top1": rec["holdout_top1"]}, step=fits
            )
        if ctx.is_main:
            what = (
                f"held-out top-1 {rec['holdout_top1']:.2f}%"
                if "holdout_top1" in rec
                else "refit on all train"
            )
            print(
                f"logreg l2 {rec['l2']:.0e}  {what}  ({int(rec['iterations'])} L-BFGS iterations, "
                f"{rec['seconds']:.1f} s)",
                flush=True,
            )

    grid = (proto.l2,) if proto.l2 is not None else proto.l2_grid
    result = logreg_eval(
        f_train,
        y_train,
        f_val,
        y_val,
        job.num_classes,
        grid=grid,
        holdout=proto.holdout,
        seed=proto.seed,
        max_iter=proto.max_iter,
        on_fit=on_fit,
    )
    job.tracker.log_metrics(
        {
            "logreg_l2_chosen": result.l2,
            "train_loss": result.train_loss,
            "logreg_iterations": float(result.fit.iterations),
            "logreg_converged": float(result.fit.converged),
            "logreg_seconds": result.seconds,
        }
    )
    extra = {
        "protocol": "logreg",
        "features": "cached",
        "crop": proto.crop,
        "l2": result.l2,
        "train_loss": result.train_loss,
        "iterations": result.fit.iterations,
        "converged": result.fit.converged,
        "search": result.search,
    }
    payload = job.report(result.top1, result.top5, val_dir, result.val_samples, extra, json_path)
    if ctx.is_main:
        note = "" if result.fit.converged else f", NOT converged in max_iter={proto.max_iter}"
        print(
            f"linear top-1 {result.top1:.2f}%  top-5 {result.top5:.2f}%  (protocol=logreg, "
            f"l2 {result.l2:.0e}, {result.fit.iterations} iterations{note}, "
            f"{result.val_samples} val images, {job.spec.label})",
            flush=True,
        )
    return payload


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
    _check_json_path(json_path)

    def params(proto: LinearProtocol) -> dict[str, Any]:
        return {
            "knn.k": k,
            "knn.t": t,
            "batch_size": proto.batch_size,
            "data.crop": proto.crop,
            "device": proto.device,
        }

    with eval_job("knn", spec, train_dir, val_dir, proto, params, track, tracking_uri, experiment) as job:
        proto, ctx = job.proto, job.ctx
        job.backbone.to(ctx.device)
        make_loader = make_loader or default_loader()
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
            return extract_features(job.backbone, loader, ctx.device)

        f_train, y_train = features(train_dir)
        f_val, y_val = features(val_dir)
        result = knn_evaluate(f_val, y_val, f_train, y_train, job.num_classes, k=k, t=t)
        payload = job.report(result.top1, result.top5, val_dir, result.total, {"k": k, "t": t}, json_path)
        if ctx.is_main:
            print(
                f"knn top-1 {result.top1:.2f}%  (k={k}, t={t}, {result.total} val images, {spec.label})",
                flush=True,
            )
        return payload


def fail(command: str, exc: BaseException) -> int:
    """Print a one-line error for ``command`` and return the exit status 2."""
    print(f"unmix {command}: error: {exc}", file=sys.stderr)
    return 2
