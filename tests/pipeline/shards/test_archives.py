"""``write_archive_shards``: the writing every archive reader shares, on a stand-in archive."""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.pipeline.shards import read_manifest, verify_shards
from unmix.pipeline.shards.archives import SplitImages, encode_jpeg, write_archive_shards


class _Images(list):
    """A list that can be watched with a weak reference."""


class FakeArchive:
    """Two splits of PNG images (so the writer re-encodes them at the quality it is given); records when
    each split is built and whether the previous split's images were still alive then."""

    classes = ["n01", "n02"]
    class_names = ["alpha", "beta"]
    default_quality = 77

    def __init__(self, out: Path):
        self.out = out
        self.events: list[str] = []
        self.alive: list[weakref.ref] = []

    def notes(self) -> list[str]:
        return []

    def split_images(self, quality: int) -> Iterator[SplitImages]:
        for name, n, labeled in (("train", 6, True), ("unlabeled", 4, False)):
            earlier = [f"{r() is not None}" for r in self.alive]
            on_disk = sorted(p.parent.name for p in self.out.glob("*/manifest.json"))
            self.events.append(f"build {name}: earlier alive {earlier}, written {on_disk}")
            images = _Images((f"{i}.png", _png(i), i % 2) for i in range(n))
            self.alive.append(weakref.ref(images))
            yield SplitImages(
                name, f"fake-{name}", images, f"fake archive ({name}), quality {quality}", labeled
            )
            del images


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_every_split_is_written_with_what_the_archive_says(tmp_path: Path):
    out = tmp_path / "out"
    archive = FakeArchive(out)
    written = write_archive_shards(archive, out, samples_per_shard=4, seed=3, progress=False)
    assert list(written) == ["train", "unlabeled"]
    for name, n, labeled in (("train", 6, True), ("unlabeled", 4, False)):
        m = read_manifest(out / name)
        assert (m.split, m.total, m.labeled, m.seed) == (name, n, labeled, 3)
        assert m.classes == ["n01", "n02"] and m.class_names == ["alpha", "beta"]
        assert m.source == f"fake archive ({name}), quality 77"  # the archive's default quality
        assert m.options["quality"] == 77 and m.encoded == {"converted": n}  # PNG -> JPEG at 77
        assert written[name].total == n and verify_shards(out / name) == []
    # One split in memory at a time: the first is on disk and released before the second is built.
    assert archive.events == [
        "build train: earlier alive [], written []",
        "build unlabeled: earlier alive ['False'], written ['train']",
    ]


def test_quality_is_checked_before_anything_is_built(tmp_path: Path):
    archive = FakeArchive(tmp_path / "out")
    with pytest.raises(ValueError, match="quality must be in 1..100, got 0"):
        write_archive_shards(archive, tmp_path / "out", quality=0, progress=False)
    assert archive.events == [] and not (tmp_path / "out").exists()
    write_archive_shards(archive, tmp_path / "out", quality=40, progress=False)
    assert read_manifest(tmp_path / "out" / "train").options["quality"] == 40


def test_encode_jpeg_keeps_full_chroma():
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.open(io.BytesIO(encode_jpeg(image, 100)))
    assert img.format == "JPEG" and img.size == (16, 16)
    # 4:4:4: every component sampled 1x1 (4:2:0 would give the luma 2x2)
    assert {c[1:3] for c in img.layer} == {(1, 1)}, img.layer
    err = np.abs(np.asarray(img.convert("RGB")).astype(int) - image)
    assert err.mean() < 1.0
