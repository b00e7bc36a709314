"""Fixtures of the archive readers' tests: pack members as the published archives are, read shards back."""

from __future__ import annotations

import io
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image


def _pack(members: dict[str, bytes], root: Path, name: str, top: str, kind: str) -> Path:
    """``members`` (path under ``top`` -> bytes) as ``root/name`` (``tar.gz`` or ``zip``, every member
    under ``top/``) or as the extracted folder ``root/top`` (``folder``); returns the archive or folder."""
    if kind == "folder":
        path = root / top
        for rel, data in members.items():
            (path / rel).parent.mkdir(parents=True, exist_ok=True)
            (path / rel).write_bytes(data)
        return path
    path = root / name
    if kind == "tar.gz":
        with tarfile.open(path, "w:gz") as tar:
            for rel, data in members.items():
                info = tarfile.TarInfo(f"{top}/{rel}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            dirs = sorted({f"{top}/"} | {f"{top}/{d}/" for rel in members for d in Path(rel).parents[:-1]})
            for d in dirs:
                z.writestr(d, b"")  # directory entries, as the official zips have
            for rel, data in members.items():
                z.writestr(f"{top}/{rel}", data)
    else:
        raise ValueError(f"unknown archive kind {kind!r}")
    return path


@pytest.fixture
def pack_archive() -> Callable[[dict[str, bytes], Path, str, str, str], Path]:
    """``pack_archive(members, root, name, top, kind)``: write an archive (``tar.gz``, ``zip``) or its
    extracted ``folder``, the members under the archive's top-level directory ``top``."""
    return _pack


def _read_shards(shard_dir: Path, size: tuple[int, int] | None = None) -> dict[str, tuple[Any, int | None]]:
    import webdataset as wds

    from unmix.pipeline.shards import read_manifest

    out: dict[str, tuple[Any, int | None]] = {}
    for s in wds.WebDataset(read_manifest(shard_dir).tar_paths, shardshuffle=False):
        image: Any = s["jpg"]
        if size is not None:
            img = Image.open(io.BytesIO(image))
            assert img.format == "JPEG" and img.size == size, (s["__key__"], img.format, img.size)
            image = np.asarray(img.convert("RGB"))
        out[s["__key__"]] = (image, int(s["cls"]) if "cls" in s else None)
    return out


@pytest.fixture
def read_shards() -> Callable[..., dict[str, tuple[Any, int | None]]]:
    """``read_shards(dir, size=None)``: every sample of a shard set, read with webdataset (not our reader):
    key -> (image, the ``.cls`` label or None when the sample has no ``.cls``). The image is the ``.jpg``
    member's bytes; with ``size`` (width, height) it is checked to be a JPEG of that size and decoded to
    an RGB array."""
    return _read_shards


@pytest.fixture
def run_shards(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``run_shards(*args)``: ``unmix shards ARGS -q`` in this process; returns (exit status, stdout,
    stderr)."""
    from unmix.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        status = main(["shards", *map(str, args), "-q"])
        out, err = capsys.readouterr()
        return status, out, err

    return run
