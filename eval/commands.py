"""``unmix linear``, ``unmix knn``, ``unmix compare`` (and ``unmix demo``, from :mod:`eval.demo`)."""

from __future__ import annotations

import argparse

from unmix.eval import demo

LINEAR_EPILOG = """\
key=value overrides:
  protocol=moco|byol   moco (default): SGD lr 30 per 256 images, momentum 0.9, wd 0, batch 256, 100 epochs,
                       lr x0.1 at 60 and 80 (scaled with epochs); byol: SGD Nesterov momentum 0.9, wd 0,
                       lr 0.2 per 256 with cosine decay, batch 1024, 80 epochs
  epochs, batch_size (global), lr (per 256 images; applied: lr * batch_size / 256), seed
  device=gpu|cpu       data.crop (default: the backbone's pretraining crop, else 224)
  features=augmented|cached   augmented (default): RandomResizedCrop+flip, backbone forward every epoch;
                       cached: features extracted once with the val transform (fast path for CPU/small data)
  num_threads (DALI), eval_every (val every N epochs; always after the last)
  head_norm=bn|none    bn (default): BatchNorm1d without affine parameters before the linear layer (MAE's
                       probe; insensitive to the features' scale); none: the protocols exactly as published
A diverging probe (non-finite loss, or loss above its first epoch's / 3 ln C for 3 epochs with val top-1
near chance) fails with exit status 2 naming lr and head_norm; no accuracy is reported.
--pixels: the same probe on the resized (data.crop), normalised raw pixels: the cheapest honest floor.
Output: top-1/top-5 (%) on stdout and in --json; an MLflow run in the pretraining run's experiment (tag
unmix.pretrain_run_id; train_loss/val_top1/lr per epoch); linear_top1/linear_top5 on the pretraining run.
Distributed: run under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS); val counted once.
"""

KNN_EPILOG = """\
key=value overrides: batch_size, device (gpu|cpu), data.crop, num_threads, seed.
Weighted kNN (InstDisc / MoCo monitor): cosine similarity on L2-normalised features (val transform), the k
nearest training features vote with weight exp(sim / t). knn_top1/knn_top5 go onto the pretraining run.
"""

COMPARE_EPILOG = """\
Pretraining runs: tag unmix.kind=pretrain (or tags method + unmix without unmix.kind); tags method, unmix
(on/off/true/false); params model.arch, optim.epochs, optim.batch_size (global); metrics loss, images_per_s,
linear_top1, linear_top5, knn_top1. Random-init evaluations (tag unmix.kind=random_init) give floor rows,
`unmix linear --pixels` (tag unmix.kind=pixels) the "raw pixels" floor row.
Rows equal in (method, arch, epochs, batch) and differing in Un-Mix are paired; the Un-Mix row shows the gain.
"""


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--backbone",
        metavar="PATH",
        help="backbone.pt from `unmix train`, or a torchvision ResNet state_dict (then give --arch)",
    )
    src.add_argument(
        "--random-init", metavar="ARCH", help="evaluate an untrained backbone of this architecture"
    )
    src.add_argument(
        "--pixels",
        action="store_true",
        help="the pixel floor: the same evaluation on the resized (data.crop), normalised raw pixels",
    )
    p.add_argument("--arch", help="architecture of a bare state_dict (backbone.pt files carry their own)")
    p.add_argument(
        "--width",
        type=int,
        default=64,
        help="base channel width of --random-init (default 64, torchvision's)",
    )
    p.add_argument(
        "--train", required=True, metavar="DIR", help="training shards (directory with manifest.json)"
    )
    p.add_argument("--val", required=True, metavar="DIR", help="validation shards")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the backbone's own)",
    )
    p.add_argument(
        "--experiment",
        metavar="NAME",
        help="MLflow experiment when the backbone has no pretraining run (e.g. --random-init)",
    )
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the ``unmix`` parser."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "linear", help="linear evaluation of a frozen backbone", epilog=LINEAR_EPILOG, formatter_class=fmt
    )
    _add_backbone_args(p)
    p.set_defaults(func=_linear)

    p = sub.add_parser(
        "knn", help="weighted kNN evaluation of a frozen backbone", epilog=KNN_EPILOG, formatter_class=fmt
    )
    _add_backbone_args(p)
    p.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
    p.add_argument(
        "--t", type=float, default=0.1, help="temperature of the vote weights exp(sim/t) (default 0.1)"
    )
    p.set_defaults(func=_knn)

    p = sub.add_parser(
        "compare",
        help="compare pretraining runs from MLflow (table and plot)",
        epilog=COMPARE_EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--experiment", metavar="NAME", help="only this experiment (default: all)")
    p.add_argument("--runs", nargs="+", metavar="ID", help="exactly these pretraining runs")
    p.add_argument("--tracking-uri", metavar="URI", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")
    p.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    p.add_argument("--plot", metavar="FILE", help="write loss and evaluation curves to this PNG")
    p.set_defaults(func=_compare)

    demo.register(sub)


def _spec(args: argparse.Namespace):  # -> jobs.BackboneSpec
    from unmix.eval.jobs import BackboneSpec

    return BackboneSpec(
        path=args.backbone,
        arch=args.arch,
        random_init=args.random_init,
        width=args.width,
        pixels=args.pixels,
    )


def _linear(args: argparse.Namespace) -> int:
    from unmix.eval.jobs import fail, run_linear
    from unmix.eval.protocols import LINEAR_KEYS, parse_overrides, resolve_protocol
    from unmix.training.atomic import WriteError

    try:
        proto = resolve_protocol(parse_overrides(args.overrides, LINEAR_KEYS))
        run_linear(
            _spec(args),
            args.train,
            args.val,
            proto,
            json_path=args.json,
            track=not args.no_mlflow,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
        )
    except (ValueError, FileNotFoundError, FloatingPointError, WriteError) as exc:  # ProbeDivergedError too
        return fail("linear", exc)
    return 0


def _knn(args: argparse.Namespace) -> int:
    from unmix.eval.jobs import fail, run_knn
    from unmix.eval.protocols import KNN_KEYS, parse_overrides, resolve_protocol
    from unmix.training.atomic import WriteError

    try:
        proto = resolve_protocol(parse_overrides(args.overrides, KNN_KEYS))
        run_knn(
            _spec(args),
            args.train,
            args.val,
            proto,
            k=args.k,
            t=args.t,
            json_path=args.json,
            track=not args.no_mlflow,
            tracking_uri=args.tracking_uri,
            experiment=args.experiment,
        )
    except (ValueError, FileNotFoundError, WriteError) as exc:
        return fail("knn", exc)
    return 0


def _compare(args: argparse.Namespace) -> int:
    import os

    from unmix.eval import compare
    from unmix.eval.jobs import fail
    from unmix.eval.tracking import existing_store
    from unmix.training.atomic import WriteError

    try:
        uri = existing_store(args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))  # read-only
        comp = compare.collect(uri, experiment=args.experiment, run_ids=args.runs)
    except ValueError as exc:
        return fail("compare", exc)
    print(compare.render(comp, args.format), end="")
    if args.plot:
        try:
            compare.plot(comp, args.plot, tracking_uri=uri)
        except WriteError as exc:
            return fail("compare", exc)
    return 0
