"""STL-10 from its binary archive into shard sets: ``unmix shards stl10 ARCHIVE OUT``.

Reads ``stl10_binary.tar.gz`` (https://cs.stanford.edu/~acoates/stl10/) or the extracted
``stl10_binary/`` folder (or a directory holding it), without extracting anything to disk:

- ``train_X.bin`` / ``train_y.bin``: 5,000 labelled images; ``test_X.bin`` / ``test_y.bin``: 8,000;
  ``unlabeled_X.bin``: 100,000 images without labels; ``class_names.txt``: the 10 class names, one a line.
- ``*_X.bin``: uint8, 3 x 96 x 96 bytes per image, one colour plane after the other (red, green, blue),
  each plane in **column-major** order (the first 96 bytes are the first column, top to bottom), as the
  data set's own reader (``np.reshape(x, (-1, 3, 96, 96)).transpose(0, 3, 2, 1)``) reads them.
- ``*_y.bin``: one uint8 label per image, 1..10 (1 = the first line of ``class_names.txt``).

It writes ``OUT/train`` (train_X), ``OUT/unlabeled`` and ``OUT/val`` (the test split) through
:func:`~unmix.pipeline.shards.archives.write_archive_shards`, labels 0-based (0..9) as in every other shard
set. The unlabeled set's samples hold no ``.cls`` member and its manifest says ``"labeled": false`` (its
``classes`` are the 10 names, for reference); pretraining reads it, alone or with ``OUT/train``
(``data.train: [OUT/train, OUT/unlabeled]``: the paper's 105,000 images), and the evaluation loaders refuse
it. Sample keys are the image's index in its split, so every sample traces back to its archive row.

Images are stored as JPEG at ``quality`` (default 100) with 4:4:4 chroma, as ``shards cifar`` does (a
decoded pixel differs from the archive's by ~0.5 grey levels on average, at most a few).

The archive is untrusted input: every member's size is checked against the layout before it is read
(an image member must hold exactly one image per label, or a whole number of images for the unlabeled
split, and no more than the official archive's count), image members are read in chunks of
:data:`CHUNK` images, and every error names the archive member at fault. Memory: the encoded JPEGs of
one split are held until it is written (~1.5 GB for the unlabeled split at quality 100, about half at
95; estimated from one 96-px photo: 15 KB at 100, 7 KB at 95).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

import numpy as np

from unmix.pipeline.shards.archives import SplitImages, encode_jpeg

SIDE = 96  # STL-10 images are 96x96 RGB
ROW = 3 * SIDE * SIDE  # 27,648 bytes per image in *_X.bin
NUM_CLASSES = 10
FOLDER = "stl10_binary"  # the archive's top-level directory
CLASS_NAMES = "class_names.txt"
MAX_CLASS_NAMES_BYTES = 64 << 10
CHUNK = 1024  # images read (and held raw) at a time: 27 MiB


@dataclass(frozen=True)
class Split:
    """One split of the archive: where its images and labels are and how many the official one holds."""

    name: str  # the output set: OUT/<name>
    images: str  # *_X.bin
    labels: str | None  # *_y.bin; None: unlabeled
    standard: int  # images in the official archive


SPLITS = (
    Split("train", "train_X.bin", "train_y.bin", 5000),
    Split("unlabeled", "unlabeled_X.bin", None, 100_000),
    Split("val", "test_X.bin", "test_y.bin", 8000),
)


class Stl10Error(ValueError):
    """The archive is unusable; the message names the archive and the member at fault."""


class _Members:
    """Sizes and streams of the named members of an archive (.tar / .tar.gz) or an extracted folder."""

    def __init__(self, path: Path):
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._infos: dict[str, tarfile.TarInfo] = {}
        self.root: Path | None = None
        if path.is_dir():
            for root in (path, path / FOLDER):
                if (root / CLASS_NAMES).is_file():
                    self.root = root
                    break
            else:
                raise Stl10Error(
                    f"{path}: not an extracted STL-10 binary archive (no {CLASS_NAMES} in it or in "
                    f"{path / FOLDER})"
                )
        elif path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise Stl10Error(f"{path}: not a readable tar archive ({exc})") from None
            infos: list[tarfile.TarInfo] = []
            try:
                for info in self._tar:  # one pass over the headers: offsets and sizes, no data kept
                    infos.append(info)
            except (tarfile.TarError, OSError, EOFError) as exc:
                # the archive ends (or is damaged) inside the data of the last member read
                at = f"{path}:{infos[-1].name}" if infos else str(path)
                raise Stl10Error(f"{at}: truncated or damaged archive ({exc})") from None
            self._infos = {i.name: i for i in infos}
            if f"{FOLDER}/{CLASS_NAMES}" not in self._infos:
                raise Stl10Error(f"{path}: not an STL-10 binary archive (no {FOLDER}/{CLASS_NAMES} inside)")
        else:
            raise Stl10Error(f"{path}: no such file or directory")

    def where(self, name: str) -> str:
        if self._tar is not None:
            return f"{self.path}:{FOLDER}/{name}"
        assert self.root is not None
        return str(self.root / name)

    def _missing(self, name: str) -> Stl10Error:
        needed = ", ".join([CLASS_NAMES] + [m for s in SPLITS for m in (s.images, s.labels) if m])
        return Stl10Error(f"{self.where(name)}: missing (STL-10 needs {needed})")

    def size(self, name: str) -> int:
        """The member's size in bytes, from the tar header or the file system (nothing is read)."""
        if self._tar is not None:
            info = self._infos.get(f"{FOLDER}/{name}")
            if info is None or not info.isfile():
                raise self._missing(name)
            return info.size
        assert self.root is not None
        p = self.root / name
        if not p.is_file():
            raise self._missing(name)
        return p.stat().st_size

    def open(self, name: str) -> IO[bytes]:
        """A binary stream of the member (read in memory: nothing is extracted to disk)."""
        self.size(name)  # present and a regular file
        if self._tar is not None:
            f = self._tar.extractfile(self._infos[f"{FOLDER}/{name}"])
            assert f is not None
            return f
        assert self.root is not None
        return open(self.root / name, "rb")

    def read(self, name: str, size: int) -> bytes:
        """All ``size`` bytes of the member (its size checked by the caller); a short read is an error."""
        with self.open(name) as f:
            try:
                data = f.read(size)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise Stl10Error(f"{self.where(name)}: cannot read ({exc})") from None
        if len(data) != size:
            raise Stl10Error(f"{self.where(name)}: truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _class_names(members: _Members) -> list[str]:
    where = members.where(CLASS_NAMES)
    size = members.size(CLASS_NAMES)
    if size > MAX_CLASS_NAMES_BYTES:
        raise Stl10Error(f"{where}: {size} bytes, far more than {NUM_CLASSES} class names")
    try:
        text = members.read(CLASS_NAMES, size).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Stl10Error(f"{where}: not UTF-8 text ({exc})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != NUM_CLASSES:
        raise Stl10Error(f"{where}: {len(names)} class names, STL-10 has {NUM_CLASSES}")
    if len(set(names)) != len(names):
        raise Stl10Error(f"{where}: duplicate class names")
    return names


def _labels(members: _Members, split: Split) -> np.ndarray:
    """The split's labels, 0-based int64 ``[N]``, checked (count bound, range 1..10 in the file)."""
    assert split.labels is not None
    where, size = members.where(split.labels), members.size(split.labels)
    if size == 0:
        raise Stl10Error(f"{where}: empty (one uint8 label per image expected)")
    if size > split.standard:
        raise Stl10Error(
            f"{where}: {size} labels, more than the official STL-10 {split.name} split's {split.standard}"
        )
    raw = np.frombuffer(members.read(split.labels, size), dtype=np.uint8)
    bad = np.flatnonzero((raw < 1) | (raw > NUM_CLASSES))
    if bad.size:
        raise Stl10Error(f"{where}: label {int(raw[bad[0]])} of image {int(bad[0])} out of range (1..10)")
    return raw.astype(np.int64) - 1


def _count(members: _Members, split: Split, labels: np.ndarray | None) -> int:
    """Images in the split's image member, from its size alone (checked against the labels)."""
    where, size = members.where(split.images), members.size(split.images)
    if size % ROW:
        raise Stl10Error(
            f"{where}: {size} bytes is not a whole number of {SIDE}x{SIDE} RGB images ({ROW} bytes each); "
            "truncated?"
        )
    n = size // ROW
    if labels is not None and n != len(labels):
        raise Stl10Error(
            f"{where}: {n} images but {members.where(split.labels or '')} holds {len(labels)} labels"
        )
    if n == 0:
        raise Stl10Error(f"{where}: holds no image")
    if n > split.standard:
        raise Stl10Error(
            f"{where}: {n} images, more than the {split.standard} of the official STL-10 {split.name} split"
        )
    return n


def to_hwc(raw: np.ndarray) -> np.ndarray:
    """``[N, 27648]`` uint8 rows of the binary format -> ``[N, 96, 96, 3]`` images (rows, columns, RGB)."""
    # each plane column-major: byte c*9216 + x*96 + y is channel c at row y, column x
    return np.ascontiguousarray(raw.reshape(-1, 3, SIDE, SIDE).transpose(0, 3, 2, 1))


def _images(members: _Members, split: Split, n: int) -> Iterator[np.ndarray]:
    """The split's images in chunks of at most :data:`CHUNK`, ``[k, 96, 96, 3]`` uint8."""
    where = members.where(split.images)
    with members.open(split.images) as f:
        done = 0
        while done < n:
            k = min(CHUNK, n - done)
            try:
                data = f.read(k * ROW)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise Stl10Error(f"{where}: cannot read image {done} ({exc})") from None
            if len(data) != k * ROW:
                raise Stl10Error(
                    f"{where}: truncated at image {done + len(data) // ROW} of {n} (the header says {n})"
                )
            yield to_hwc(np.frombuffer(data, dtype=np.uint8).reshape(k, ROW))
            done += k


@dataclass
class Stl10Archive:
    """A checked STL-10 archive: class names, per split the image count and labels (None: unlabeled)."""

    path: Path
    classes: list[str]
    counts: dict[str, int]
    labels: dict[str, np.ndarray | None]
    members: dict[str, list[str]] = field(default_factory=dict)  # split -> the members it comes from
    default_quality: ClassVar[int] = 100
    class_names: ClassVar[tuple[str, ...]] = ()  # the classes are names already

    def notes(self) -> list[str]:
        """Departures from the official archive's counts (a subset is allowed, but said)."""
        out = []
        for split in SPLITS:
            if split.name not in self.counts:
                continue
            n, labels = self.counts[split.name], self.labels[split.name]
            if labels is None:
                if n != split.standard:
                    out.append(f"{split.name}: {n} images (the official STL-10 has {split.standard})")
                continue
            c = np.bincount(labels, minlength=NUM_CLASSES)
            if n != split.standard or c.min() != c.max():
                out.append(
                    f"{split.name}: {n} images, {c.min()}..{c.max()} per class (the official STL-10 has "
                    f"{split.standard}, {split.standard // NUM_CLASSES} per class)"
                )
        return out

    def split_images(self, quality: int) -> Iterator[SplitImages]:
        """The splits read, in archive order, as JPEG at ``quality``, 4:4:4; a sample's key is its row.

        The image members are read now, :data:`CHUNK` images at a time; one split's JPEGs are held at once.
        """
        members = _Members(self.path)
        try:
            for split in SPLITS:
                if split.name not in self.counts:
                    continue
                n, labels = self.counts[split.name], self.labels[split.name]
                if members.size(split.images) != n * ROW:  # the archive changed since it was read
                    raise Stl10Error(f"{members.where(split.images)}: changed since it was checked")
                digits = len(str(n))
                items, i = [], 0
                for chunk in _images(members, split, n):
                    for img in chunk:
                        label = 0 if labels is None else int(labels[i])  # unlabeled: not written
                        items.append((f"{i:0{digits}d}.jpg", encode_jpeg(img, quality), label))
                        i += 1
                yield SplitImages(
                    split.name,
                    f"{FOLDER}-{split.name}",
                    items,
                    f"STL-10 binary archive {self.path} "
                    f"({', '.join(Path(m).name for m in self.members[split.name])}), "
                    f"JPEG quality {quality} 4:4:4",
                    labeled=labels is not None,
                )
                del items  # written: free it before the next split is read
        finally:
            members.close()


def read_stl10(path: str | Path, splits: tuple[str, ...] = ("train", "unlabeled", "val")) -> Stl10Archive:
    """Check an STL-10 binary archive (``.tar.gz`` or folder): class names, labels, member sizes.

    Reads only the small members (names, labels); the images are read when the splits are written
    (:meth:`Stl10Archive.split_images`).
    """
    unknown = sorted(set(splits) - {s.name for s in SPLITS})
    if unknown:
        raise ValueError(f"unknown STL-10 split {unknown[0]!r}; splits: train, unlabeled, val")
    members = _Members(Path(path))
    try:
        classes = _class_names(members)
        counts, labels, names = {}, {}, {}
        for split in SPLITS:
            if split.name not in splits:
                continue
            labels[split.name] = _labels(members, split) if split.labels else None
            counts[split.name] = _count(members, split, labels[split.name])
            names[split.name] = [members.where(m) for m in (split.images, split.labels) if m]
    finally:
        members.close()
    return Stl10Archive(Path(path).resolve(), classes, counts, labels, names)
