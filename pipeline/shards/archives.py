"""A published data set's archive as shard sets: what the CIFAR, STL-10 and Tiny ImageNet readers share.

Each reader (:func:`~unmix.pipeline.shards.cifar.read_cifar`,
:func:`~unmix.pipeline.shards.stl10.read_stl10`,
:func:`~unmix.pipeline.shards.tiny_imagenet.read_tiny_imagenet`) checks an archive and returns an
:class:`Archive`: its classes, what departs from the official counts, and its splits as encoded images,
one split at a time (a split is built only when it is written, so at most one is held in memory).
:func:`write_archive_shards` writes each as ``OUT/<split>`` through
:func:`unmix.pipeline.shards.writer.write_shards`, which copies the ready JPEGs (one process: nothing is
left to prepare)::

    write_archive_shards(read_cifar("cifar-10-python.tar.gz"), "data/cifar10")  # data/cifar10/{train,val}
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from unmix.pipeline.shards.manifest import Manifest
from unmix.pipeline.shards.sources import memory_source
from unmix.pipeline.shards.writer import write_shards


@dataclass(frozen=True)
class SplitImages:
    """One split of an archive, ready to write."""

    name: str  # "train", "val", "unlabeled": the shard set OUT/<name> and its shard name prefix
    origin: str  # the in-memory source's name, e.g. "cifar-10-batches-py-train"
    images: list[tuple[str, bytes, int]]  # (name in the split, encoded image, class index)
    description: str  # what the manifest records as the source: archive, members, encoding
    labeled: bool = True  # False: no .cls members (the labels in ``images`` are ignored)


class Archive(Protocol):
    """What a reader returns: a checked archive that yields its splits on demand."""

    classes: list[str]  # class names (or ids), index = label
    class_names: Sequence[str]  # human-readable names aligned with ``classes`` where those are ids; or empty
    default_quality: int  # JPEG quality when none is given

    def notes(self) -> list[str]:
        """Departures from the official archive's counts (a subset is allowed, but said)."""
        ...

    def split_images(self, quality: int) -> Iterator[SplitImages]:
        """The splits to write, built one at a time; images that are not JPEG encoded at ``quality``."""
        ...


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of one uint8 HWC RGB image, 4:4:4 (no chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_archive_shards(
    archive: Archive,
    out: str | Path,
    *,
    quality: int | None = None,
    samples_per_shard: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Write ``out/<split>`` for every split of ``archive``; returns the manifests by split name.

    ``quality``: JPEG quality for the images the archive encodes (default: ``archive.default_quality``);
    the other arguments as :func:`~unmix.pipeline.shards.writer.write_shards` takes them.
    """
    quality = archive.default_quality if quality is None else quality
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    out = Path(out)
    manifests = {}
    for split in archive.split_images(quality):
        manifests[split.name] = write_shards(
            memory_source(split.origin, split.images, archive.classes),
            out / split.name,
            split=split.name,
            samples_per_shard=samples_per_shard,
            seed=seed,
            quality=quality,
            workers=1,  # the images are in memory, encoded: the writer validates and copies them
            overwrite=overwrite,
            progress=progress,
            source_name=split.description,
            labeled=split.labeled,
            class_names=list(archive.class_names) or None,
        )
        del split  # before the next split is built: one split's images in memory at a time
    return manifests
