"""``unmix shards ...`` and ``unmix bench shards|pipeline``: the pipeline package's subcommands.

Usable on its own too: ``python -m unmix.pipeline shards write SRC OUT``.
"""

from __future__ import annotations

import argparse

from unmix.pipeline import bench, shards_cli


def register(sub: argparse._SubParsersAction) -> None:
    """Add the pipeline's subcommands (``shards``) to the ``unmix`` parser."""
    shards_cli.register(sub)


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench shards`` and ``bench pipeline``."""
    shards_cli.register_bench(bench_sub)
    bench.register_bench(bench_sub)
