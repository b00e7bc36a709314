"""``unmix train``, ``unmix config-docs``, ``unmix bench train`` and ``unmix bench gpu``."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``config-docs`` to the ``unmix`` parser."""
    p = sub.add_parser(
        "train",
        help="pretrain MoCo v2/v1, BYOL or SimCLR (+ Un-Mix) under DeepSpeed; resumes",
        description=(
            "Pretrain according to CONFIG (YAML) with dotted key=value overrides, e.g. "
            "`unmix train configs/digits_mocov2_unmix.yaml optim.epochs=2 output_dir=runs/x`. "
            "Runs as one process or under torchrun, the deepspeed launcher or srun. Re-running on the same "
            "output_dir resumes from its newest complete checkpoint. Exit status: 0 done, 75 checkpointed "
            "after SIGUSR1/SIGTERM (requeue), 1 failure (e.g. non-finite loss), 2 bad config, impossible "
            "or refused resume (a checkpoint file holding code), a data fault (data.train missing, "
            "unreadable, or not matching its manifest) or an output_dir that cannot be written "
            "(read-only, disk full: the last good checkpoint is kept)."
        ),
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. optim.lr=0.06")
    p.add_argument(
        "--force-config",
        action="store_true",
        help="resume even though the config differs from the checkpoint's in keys that change the run",
    )
    p.set_defaults(func=_train)
    from unmix.training import config_docs  # imports no torch: `unmix --help` stays fast

    config_docs.register(sub)


def _train(args: argparse.Namespace) -> int:
    from unmix.training.preemption import record_early

    record_early()  # before torch loads: a SIGUSR1/SIGTERM during start-up must not kill the rank
    from unmix.training.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"unmix train: error: {exc}", file=sys.stderr)
        return 2
    from unmix.training.versions import VersionError, check

    try:  # one line naming the package when an installed version is below what the code needs
        warnings = check(need_dali=cfg.data.source == "dali")
    except VersionError as exc:
        print(f"unmix train: error: {exc}", file=sys.stderr)
        return 2
    for line in warnings if cfg.data.device == "gpu" else []:
        print(f"unmix train: warning: {line}", file=sys.stderr)
    from unmix.pipeline.shards.manifest import ShardSetError, check_shard_set
    from unmix.training.config import train_sets

    try:  # cheap data checks before any process group, DeepSpeed engine or MLflow run exists
        several = isinstance(cfg.data.train, list)
        manifests = [  # every set of the union when data.train is a list; synthetic images need none
            check_shard_set(path, key=f"data.train[{i}]" if several else "data.train")
            for i, path in enumerate(train_sets(cfg) if cfg.data.source != "synthetic" else [])
        ]
    except ShardSetError as exc:
        print(f"unmix train: error: {exc}", file=sys.stderr)
        return 2
    if cfg.eval.knn_every_epochs and cfg.data.val and not any(m.labeled for m in manifests):
        print(
            "unmix train: error: data.train: no shard set has labels (manifest labeled: false), so the kNN "
            "monitor (eval.knn_every_epochs) has no memory bank; add a labelled set or set "
            "eval.knn_every_epochs=0",
            file=sys.stderr,
        )
        return 2
    from unmix.pipeline.labels import LabelError
    from unmix.training.atomic import WriteError, check_writable
    from unmix.training.checkpoint import ResumeError
    from unmix.training.dist import shutdown
    from unmix.training.loop import NonFiniteLossError, train

    try:
        check_writable(cfg.output_dir, "output_dir")
        code = train(cfg, force_config=args.force_config)
        shutdown()  # finished or stopped for requeue: every rank got here (errors skip it: no barrier)
        return code
    except (ConfigError, ResumeError, LabelError, WriteError) as exc:  # LabelError: a bad .cls (kNN monitor)
        print(f"unmix train: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"unmix train: error: {exc}", file=sys.stderr)
        return 1


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench train`` and ``bench gpu``."""
    p = bench_sub.add_parser(
        "train",
        help="trainer step throughput vs a plain PyTorch loop, and the cost of Un-Mix",
        description=(
            "Times optimizer steps of this trainer (DeepSpeed engine, fp32 targets, queue) against a plain "
            "PyTorch loop of the same method and model on the same batches, with Un-Mix off and on."
        ),
    )
    p.add_argument("config", help="YAML config (data, model, method, batch size)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="timed steps = steps x repeats per variant, interleaved; medians are reported",
    )
    p.add_argument(
        "--layout-cost",
        action="store_true",
        help="also time the Un-Mix trainer step on the same batches given as NCHW tensors (the loop then "
        "converts them to channels_last every step when the model is channels_last)",
    )
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.set_defaults(func=_bench)
    _register_bench_gpu(bench_sub)


def _register_bench_gpu(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench gpu`` (its options live in training/bench_gpu.py; torch is imported only when run)."""
    p = bench_sub.add_parser(
        "gpu",
        help="prove a GPU node: training step, DeepSpeed ZeRO, NCCL, DALI on the GPU, data wait, gpu tests",
        description=(
            "Checks a GPU node in at most ~8 minutes: ResNet-50 MoCo v2/BYOL steps at bf16 (images/s, peak "
            "memory), ZeRO-1/2 steps, NCCL all_gather/Shuffle-BN, DALI loader speed and exact mixing on the "
            "GPU, CPU vs GPU output distributions, the data-wait fraction (< 5 %%), then `pytest -m gpu`. "
            "Prints a table; exit status 0 all passed, 1 a check failed, 2 no CUDA device (without "
            "--dry-run). --dry-run runs only what needs no GPU."
        ),
    )
    p.add_argument("--dry-run", action="store_true", help="only the checks that need no GPU (CI runs this)")
    p.add_argument("--json", help="also write the results as JSON to this file")
    p.add_argument(
        "--data",
        help="shards to read (a shard directory, or a root holding train/); default: `unmix shards sample "
        "photos` (1,600 images) written to a temporary directory",
    )
    p.add_argument("--batch-size", type=int, default=128, help="images per step on the GPU (default 128)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1), help="DALI CPU threads")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="checks not started within this many seconds fail as not run (default 480)",
    )
    p.add_argument("--no-tests", action="store_true", help="do not run `pytest -m gpu`")
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="ranks of the node checks (Shuffle-BN, SyncBN, key gather, ZeRO, checkpoint, throughput per "
        "GPU), launched by the command; default: all visible GPUs (--dry-run: 2 CPU ranks on gloo)",
    )
    p.set_defaults(func=_bench_gpu)


def _bench_gpu(args: argparse.Namespace) -> int:
    from unmix.training.bench_gpu import main

    return main(args)


def _bench(args: argparse.Namespace) -> int:
    from unmix.training.bench_train import main

    return main(args)
