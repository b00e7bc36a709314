"""The pipeline's command-line helpers (``unmix shards ...``)."""

from __future__ import annotations

import argparse

import pytest

from unmix.pipeline.cli import parse_size


def test_parse_size():
    assert parse_size("500MB") == 500_000_000 and parse_size("1G") == 10**9 and parse_size("256MiB") == 2**28
    assert parse_size("1.5k") == 1500 and parse_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="bad size 'lots'"):
        parse_size("lots")
