"""``unmix bench pipeline``: the DALI loader against a torchvision + webdataset DataLoader."""

from __future__ import annotations

import argparse


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    """Add ``bench pipeline``."""
