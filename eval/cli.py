"""The eval package's subcommands: ``unmix linear``, ``unmix knn``, ``unmix compare``, ``unmix bench probe``.

Each handler imports its heavy dependencies (torch, MLflow) when it runs, so building the parser stays cheap.
"""

from __future__ import annotations

import argparse
import math

LINEAR_EPILOG = """\
key=value overrides:
  protocol=logreg|moco|byol
        logreg: the reference probe (CLIP's): features cached once (val transform), standardised,
          multinomial logistic regression by L-BFGS to convergence, L2 strength from l2_grid chosen on a
          stratified held-out 10 % of train, then refit on all of train. The default (unless
          features=augmented or an SGD key below is given: then moco). Keys: l2 (fix it, no search),
          l2_grid (comma list, default 1e-6,...,1), holdout (0.1), max_iter (1000 L-BFGS iterations per
          fit).
        moco: SGD momentum 0.9, batch 256, 100 epochs, lr x0.1 at 60 and 80 (scaled with epochs);
          byol: SGD Nesterov momentum 0.9, cosine, batch 1024, 80 epochs.
          With head_norm=bn (default): byol at batch 256; on cached features (lr, weight_decay) chosen
          like logreg's L2: each pair of lr_grid (0.03,0.1,0.3 per 256) x wd_grid (0.001,0.01,0.1)
          trained on train less the stratified held-out `holdout` (0.1), the lowest held-out
          cross-entropy refit on all of train (9 fits + 1); augmented features: lr 0.3, weight_decay
          0.001. head_norm=none: the published lr (moco 30, byol 0.2), wd 0 and batch, no search, i.e.
          the paper's protocol exactly, for features of the scale it was tuned on (a contrastive
          ResNet-50's).
  SGD keys: epochs, lr (per 256 images; applied: lr * batch_size / 256; fixes the lr: no lr search),
          weight_decay (fixes it likewise), lr_grid, wd_grid (comma lists; cached features only),
          head_norm=bn|none, eval_every (val every N epochs; always after the last)
  batch_size (global), seed, device=gpu|cpu, data.crop (default: the backbone's pretraining crop, else 224)
  features=cached|augmented   cached (default): features extracted once with the val transform;
                       augmented (SGD protocols): RandomResizedCrop+flip, backbone forward every epoch.
                       Augmented heads read lower, by how invariant the features are (a random-init
                       ResNet on digits: 20 points): compare them only with each other
  num_threads (DALI)
Which probe: logreg (the default) to measure features: it is never the bottleneck; moco/byol to train an
SGD head (on cached features within about a point of logreg, docs/benchmarks.md); features=augmented to
train the way the papers do; with head_norm=none too, to reproduce a paper's protocol exactly.
Guard (SGD): a non-finite loss, a loss above its first epoch's / 3 ln C for 3 epochs with val top-1 near
chance, or a final training loss above 3 ln C whatever the accuracy, fails with exit status 2 naming lr
and head_norm; no accuracy is reported.
--pixels: the same probe on the resized (data.crop), normalised raw pixels: the cheapest honest floor.
Output: top-1/top-5 (%) on stdout and in --json; an MLflow run in the pretraining run's experiment (tags
unmix.pretrain_run_id, unmix.protocol; train_loss/val_top1/val_loss/lr per epoch; the search: logreg's,
or the SGD search_* per pair and lr_chosen/weight_decay_chosen);
linear_top1/linear_top5 and linear_<protocol>_top1/top5 on the pretraining run.
Distributed: run under torchrun or srun (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS); val counted once.
"""

KNN_EPILOG = """\
key=value overrides: batch_size, device (gpu|cpu), data.crop, num_threads, seed.
Floors: --random-init ARCH and --pixels log runs tagged unmix.kind=random_init|pixels (unmix.protocol=knn).
Weighted kNN (InstDisc / MoCo monitor): cosine similarity on L2-normalised features (val transform), the k
nearest training features vote with weight exp(sim / t). knn_top1/knn_top5 go onto the pretraining run.
"""

COMPARE_EPILOG = """\
Pretraining runs: tag unmix.kind=pretrain (or tags method + unmix without unmix.kind); tags method, unmix
(on/off/true/false); params model.arch, optim.epochs, optim.batch_size (global); metrics loss, images_per_s,
linear_top1, linear_top5, knn_top1. Random-init evaluations (tag unmix.kind=random_init) give floor rows,
`unmix linear --pixels` (tag unmix.kind=pixels) the "raw pixels" floor row.
Runs whose params differ only in seed form a group (n, mean, std); the Un-Mix gain is the mean of the
seed-paired differences (on - off) with a 95 % t interval, "within noise" when it holds 0. Each linear
number shows its protocol (tag unmix.protocol of the evaluation run).
"""


PROBE_DESCRIPTION = """\
Part 1 (accuracy): for each built-in sample (written to a scratch directory) and each backbone (a
random-init ResNet-10, the raw pixels, and any --backbone FILE), features are extracted once with the eval
transform; then logreg (the reference), moco and byol with their defaults (BN head), both with
head_norm=none and the published keys, and scikit-learn's LogisticRegression (lbfgs, C = 1 / (l2 n) with
logreg's chosen l2, same standardisation) are fitted on those features and scored on val. A probe the
divergence guard stops prints "stopped". With --augmented, moco and byol are also trained the paper's way
(backbone forward on augmented batches every epoch).

Part 2 (speed): one full-data loss + gradient of logreg's objective on synthetic features (--dim wide,
--classes classes), timed on --speed-rows rows and scaled linearly to --target-rows (ImageNet: 1.28 M x
2048, 1000 classes), with the projected time of the grid and refit for the L-BFGS evaluations the digits
run needed. Measured, not extrapolated, when the two row counts agree (on a GPU with memory for it).

--selection (instead of part 1): how the SGD heads' (lr, weight_decay) search chooses. For each sample,
backbone, protocol and seed, every pair of the default grid is trained on train less the held-out 10 %
(scored there) and refit on all of train (scored on val); printed: the val top-1 minus logreg's of the pair
each rule picks (fixed: lr 0.3 / wd 0.001; the highest held-out top-1; the lowest held-out loss, the
default; the best on val, the ceiling of any rule on this grid), mean over --seeds (worst seed).
"""

# the built-in samples bench_probe knows the crop of (SAMPLES_CROP)
PROBE_SAMPLES = ("digits", "shifted-digits", "photos")


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench probe`` (run by :func:`unmix.eval.bench_probe.main`)."""
    p = bench_sub.add_parser(
        "probe",
        help="every linear probe (logreg, moco, byol, published, sklearn) on the same features; logreg speed",
        description=PROBE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--samples", nargs="*", default=["digits"], choices=PROBE_SAMPLES)
    p.add_argument("--backbone", nargs="*", default=[], metavar="FILE", help="pretrained backbone.pt files")
    p.add_argument("--augmented", action="store_true", help="also moco/byol on augmented features (slow)")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--seeds", type=int, default=1, help="moco/byol defaults over seeds 0..N-1 (default 1)")
    p.add_argument("--speed-rows", type=int, default=65536, help="rows timed (default 65,536)")
    p.add_argument("--target-rows", type=int, default=1_281_167, help="rows projected (ImageNet train)")
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--selection", action="store_true", help="the lr/weight-decay selection rules (slow)")
    p.add_argument("--skip-speed", action="store_true")
    p.set_defaults(func=_bench_probe)
    _register_bench_fidelity(bench_sub)
    _register_bench_learning(bench_sub)


FIDELITY_METHODS = (
    "byol",
    "moco_v2",
    "simclr",
)  # the methods bench_fidelity has a setup for (METHOD_OVERRIDES)
FIDELITY_DESCRIPTION = """\
unmix train against a reference training loop, end to end, over seeds. For each seed both arms start from
the same initial weights: "unmix" runs what unmix train runs (DALI views, the pipeline's mixing,
loop.train_step under DeepSpeed, the trainer's per-step schedule); "reference" runs a plain-PyTorch loop
in the style of the authors' unmix_c10.py (PIL-decoded shard images, torchvision transforms built from the
same recipe, the authors' mixing, the reference step of unmix.training.fidelity: the authors' MoCo, BYOL
and SimCLR written from their papers, the authors' schedule). Both are scored by the same kNN at init and
after every epoch; the table gives each arm's median and range over seeds and the seed-paired difference
with its 95 % interval. Default data: the built-in digits sample, ResNet-10 width 16, batch 64.
"""


def _register_bench_fidelity(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "fidelity",
        help="unmix train against the reference (authors'/paper) loop over seeds: kNN curves",
        description=FIDELITY_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", nargs="*", default=["moco_v2"], choices=FIDELITY_METHODS)
    p.add_argument("--config", default=None, help="a training YAML instead of the built-in digits setup")
    p.add_argument(
        "--data", default=None, help="shard root with train/ and val/ (default: the digits sample)"
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per arm (default 3)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the curves and summary here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied last")
    p.set_defaults(func=_bench_fidelity)


def _bench_fidelity(args: argparse.Namespace) -> int:
    from unmix.eval.bench_fidelity import main

    return main(args)


LEARNING_METHODS = ("byol", "moco_v2", "simclr")  # the methods bench_learning has a setup for
LEARNING_DESCRIPTION = """\
Does pretraining learn? For each method and seed, unmix train (the whole trainer) pretrains a ResNet-10
(width 16, Un-Mix on) on the built-in shifted-digits sample for 110-200 steps, with the kNN monitor
scoring the initial weights (eval.knn_at_start, the run's own floor) and the last epoch; the table gives
both and the lift, median and range over seeds. Overrides go before the options (or after --), since
--method takes several values.
"""


def _register_bench_learning(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "learning",
        help="unmix train's kNN lift over its own initial weights, per method, over seeds",
        description=LEARNING_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--method", nargs="*", default=list(LEARNING_METHODS), choices=LEARNING_METHODS)
    p.add_argument("--data", default=None, help="shard root with train/ and val/ (default: shifted-digits)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the runs and summary here")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, applied last")
    p.set_defaults(func=_bench_learning)


def _bench_learning(args: argparse.Namespace) -> int:
    from unmix.eval.bench_learning import main

    return main(args)


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


def _positive_int(raw: str) -> int:
    """argparse type: an integer >= 1 (argparse names the option and exits 2 otherwise)."""
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw}: must be >= 1")
    return value


def _positive_float(raw: str) -> float:
    """argparse type: a finite number > 0 (NaN and inf refused: they turn every vote weight into NaN)."""
    value = float(raw)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"{raw}: must be a finite number > 0")
    return value


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
    p.add_argument("--k", type=_positive_int, default=200, help="neighbours (default 200)")
    p.add_argument(
        "--t",
        type=_positive_float,
        default=0.1,
        help="temperature of the vote weights exp(sim/t) (default 0.1)",
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
    from unmix.eval.eval_runs import existing_store
    from unmix.eval.jobs import fail
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


def _bench_probe(args: argparse.Namespace) -> int:
    from unmix.eval.bench_probe import main

    return main(args)
