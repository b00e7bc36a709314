"""The ``unmix`` command.

Each package registers its own subcommands in its ``cli.py`` (``register`` and ``register_bench``); this
module wires them together and registers ``demo`` (:mod:`unmix.demo`), which runs a command of each
package in turn. It sits above the three packages (``unmix.pipeline`` <- ``unmix.training`` <-
``unmix.eval``), so the dispatcher sees every package without any package importing one above it.

Subcommands import their heavy dependencies (torch, DALI, DeepSpeed, MLflow) inside the handler, so
``unmix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import unmix
import unmix.eval.cli as eval_cli
import unmix.pipeline.cli as pipeline_cli
import unmix.training.cli as training_cli
from unmix import demo


def build_parser() -> argparse.ArgumentParser:
    """The full ``unmix`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="unmix",
        description="Self-supervised pretraining with Un-Mix image mixtures (MoCo v2/v1, BYOL, SimCLR).",
    )
    parser.add_argument("--version", action="version", version=f"unmix {unmix.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline_cli.register(sub)
    training_cli.register(sub)
    eval_cli.register(sub)
    register_demo(sub)
    # `bench` last in the listing: the everyday commands come first in `unmix --help`.
    bench = sub.add_parser("bench", help="benchmarks (shards, pipeline, train, probe) and the GPU node check")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    pipeline_cli.register_bench(bench_sub)
    training_cli.register_bench(bench_sub)
    eval_cli.register_bench(bench_sub)
    return parser


def register_demo(sub: argparse._SubParsersAction) -> None:
    """Add ``demo`` (:mod:`unmix.demo`): it runs a command of each package in turn, so it belongs to none."""
    p = sub.add_parser(
        "demo",
        help="the main job on built-in data: MoCo v2 +/- Un-Mix, eval, compare",
        description=demo.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir", default="demo", help="where data, runs, MLflow store and plot go (default: ./demo)"
    )
    p.add_argument(
        "--device", choices=("cpu", "gpu"), default=None, help="default: gpu when CUDA is available, else cpu"
    )
    p.add_argument(
        "--linear-epochs",
        type=int,
        default=None,
        help="train MoCo's SGD head for this many epochs (default: the reference probe, logreg)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=2,
        help="seeds per setting (default 2: the least that shows the spread; more narrow the interval)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the pretraining config")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    demo.run_demo(
        Path(args.workdir),
        device=args.device or demo.default_device(),
        overrides=args.overrides,
        linear_epochs=args.linear_epochs,
        seeds=args.seeds,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``unmix`` console script; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # The `deepspeed` launcher appends --local_rank=N (unless given --no_local_rank): take it as LOCAL_RANK.
    for arg in [a for a in argv if a.startswith(("--local_rank=", "--local-rank="))]:
        os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        argv.remove(arg)
    args = build_parser().parse_args(argv)
    status = args.func(args)
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
