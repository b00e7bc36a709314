"""``unmix demo``: the main job on the built-in sample data."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
