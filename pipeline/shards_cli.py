"""``unmix shards write|verify|sample`` and ``unmix bench shards``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``shards`` with its subcommands."""


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench shards``."""
