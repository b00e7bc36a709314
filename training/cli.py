"""``unmix train`` and ``unmix bench train``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``train`` to the ``unmix`` parser."""


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench train``."""
