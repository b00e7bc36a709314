"""The ``unmix`` command.

Each package registers its own subcommands; this module only wires them together. It sits above the
three packages (``unmix.pipeline`` <- ``unmix.training`` <- ``unmix.eval``), so the dispatcher sees every
package without any package importing one above it.

Subcommands import their heavy dependencies (DALI, DeepSpeed, MLflow) inside the handler, so
``unmix --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

import unmix
import unmix.eval.commands as eval_commands
import unmix.pipeline.cli as pipeline_cli
import unmix.training.cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    """The full ``unmix`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="unmix",
        description="Self-supervised pretraining with Un-Mix image mixtures (MoCo v2, BYOL).",
    )
    parser.add_argument("--version", action="version", version=f"unmix {unmix.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pipeline_cli.register(sub)
    training_cli.register(sub)
    eval_commands.register(sub)
    # `bench` last in the listing: the everyday commands come first in `unmix --help`.
    bench = sub.add_parser("bench", help="benchmarks (shards, pipeline, train, probe) and the GPU node check")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="WHAT")
    pipeline_cli.register_bench(bench_sub)
    training_cli.register_bench(bench_sub)
    eval_commands.register_bench(bench_sub)
    return parser


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
