"""``python -m unmix.pipeline ...``: the pipeline's subcommands without the rest of unmix."""

import argparse
import sys

from unmix.pipeline import cli


def main(argv: list[str] | None = None) -> int:
    """Parse and run one pipeline subcommand."""
    parser = argparse.ArgumentParser(prog="python -m unmix.pipeline")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench = sub.add_parser("bench", help="benchmarks")
    cli.register(sub)
    cli.register_bench(bench.add_subparsers(dest="bench", required=True, metavar="WHAT"))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


sys.exit(main())
