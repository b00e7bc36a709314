"""The raw tar writer's member header: byte-identical to ``tarfile``'s ustar header."""

from __future__ import annotations

import tarfile

import pytest

from unmix.pipeline.shards.tar import tar_header


def test_tar_header_matches_tarfile():
    for name, size in [("00000001.jpg", 123_456), ("00000001.cls", 1), ("x" * 100, 0), ("k.jpg", 8**11 - 1)]:
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        assert tar_header(name, size) == ti.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="too long"):
        tar_header("y" * 101, 1)
