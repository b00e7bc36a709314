"""``unmix linear``, ``unmix knn``, ``unmix compare`` (and ``unmix demo``, from :mod:`eval.demo`)."""

from __future__ import annotations

import argparse

from eval import demo


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation subcommands to the ``unmix`` parser."""
    demo.register(sub)
