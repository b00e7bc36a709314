"""Tiny ImageNet from its zip into shard sets: ``unmix shards tiny-imagenet ARCHIVE OUT``.

Reads ``tiny-imagenet-200.zip`` (http://cs231n.stanford.edu/tiny-imagenet-200.zip) or the extracted
``tiny-imagenet-200/`` folder (or a directory holding it), without extracting anything to disk:

- ``wnids.txt``: the 200 class ids (WordNet ids, one a line); ``words.txt``: ``wnid<TAB>names`` for all
  of WordNet, from which each class's human-readable name is taken;
- ``train/<wnid>/images/*.JPEG``: 500 images per class (``train/<wnid>/<wnid>_boxes.txt`` is ignored);
- ``val/images/*.JPEG`` with ``val/val_annotations.txt``: ``file<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1``,
  one line per validation image (50 per class); ``test/`` has no labels and is not read.

It writes ``OUT/train`` (100,000 images) and ``OUT/val`` (10,000) through
:func:`~unmix.pipeline.shards.archives.write_archive_shards`. Classes are the wnids in sorted order
(torchvision's ``ImageFolder`` order on ``train/``), so labels agree with tools that read the extracted
tree; the manifest's ``class_names`` holds their ``words.txt`` names. Images are 64x64 JPEGs and are copied
byte for byte (some are greyscale; the decoders output RGB); anything else is re-encoded at ``quality``.
Sample keys are the index of the image's path in the split's sorted member list.

The archive is untrusted input: each member's size is checked before it is read (text files and images
have caps far above the official ones), and every error names the member at fault: a class of
``wnids.txt`` without training images or without a ``words.txt`` line, a training folder that is not a
listed class, a validation image without an annotation line, an annotation naming an absent image or an
unknown class.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from unmix.pipeline.shards.archives import SplitImages

FOLDER = "tiny-imagenet-200"
WNIDS, WORDS, ANNOTATIONS = "wnids.txt", "words.txt", "val/val_annotations.txt"
STANDARD = {"train": 100_000, "val": 10_000}
NUM_CLASSES = 200
IMAGE_SUFFIXES = (".jpeg", ".jpg")
#: Caps checked before a member is read (the official files: wnids 2 KB, words 2.6 MB, annotations
#: 0.3 MB, images ~2 KB).
MAX_TEXT_BYTES = {WNIDS: 1 << 20, WORDS: 64 << 20, ANNOTATIONS: 64 << 20}
MAX_IMAGE_BYTES = 4 << 20
#: The images of one split are held in memory until written: their declared sizes are summed first
#: (the official train split: ~200 MB).
MAX_SPLIT_BYTES = 4 << 30


class TinyImageNetError(ValueError):
    """The archive is unusable; the message names the archive and the member at fault."""


class _Members:
    """Members of the zip or the extracted folder, by path relative to ``tiny-imagenet-200/``."""

    def __init__(self, path: Path):
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self.sizes: dict[str, int] = {}  # relative path -> size (regular files only)
        if path.is_dir():
            for root in (path, path / FOLDER):
                if (root / WNIDS).is_file():
                    self.root = root
                    break
            else:
                raise TinyImageNetError(
                    f"{path}: not an extracted Tiny ImageNet (no {WNIDS} in it or in {path / FOLDER})"
                )
            for sub in ("train", "val"):
                for dirpath, dirnames, filenames in os.walk(self.root / sub):
                    dirnames.sort()
                    for f in filenames:
                        p = os.path.join(dirpath, f)
                        if os.path.isfile(p):
                            self.sizes[PurePosixPath(os.path.relpath(p, self.root)).as_posix()] = (
                                os.path.getsize(p)
                            )
            for name in (WNIDS, WORDS):
                if (self.root / name).is_file():
                    self.sizes[name] = (self.root / name).stat().st_size
            self.prefix = ""
        elif path.is_file():
            try:
                self._zip = zipfile.ZipFile(path)
                infos = self._zip.infolist()
            except (zipfile.BadZipFile, OSError, EOFError) as exc:
                raise TinyImageNetError(f"{path}: not a readable zip archive ({exc})") from None
            names = {i.filename for i in infos}
            self.prefix = f"{FOLDER}/" if f"{FOLDER}/{WNIDS}" in names else ""
            if f"{self.prefix}{WNIDS}" not in names:
                raise TinyImageNetError(f"{path}: not a Tiny ImageNet zip (no {FOLDER}/{WNIDS} inside)")
            self._infos = {}
            for i in infos:
                if i.is_dir() or not i.filename.startswith(self.prefix):
                    continue
                rel = i.filename[len(self.prefix) :]
                self.sizes[rel] = i.file_size
                self._infos[rel] = i
        else:
            raise TinyImageNetError(f"{path}: no such file or directory")

    def where(self, rel: str) -> str:
        if self._zip is not None:
            return f"{self.path}:{self.prefix}{rel}"
        return str(self.root / rel)

    def read(self, rel: str, cap: int) -> bytes:
        """The member's bytes; its size (from the zip directory or the file system) is checked first."""
        if rel not in self.sizes:
            raise TinyImageNetError(f"{self.where(rel)}: missing")
        size = self.sizes[rel]
        if size > cap:
            raise TinyImageNetError(f"{self.where(rel)}: {size} bytes, more than such a file holds ({cap})")
        try:
            if self._zip is not None:
                with self._zip.open(self._infos[rel]) as f:
                    data = f.read(cap + 1)  # the zip reader stops at the declared size and checks the CRC
            else:
                with open(self.root / rel, "rb") as f:
                    data = f.read(cap + 1)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise TinyImageNetError(f"{self.where(rel)}: cannot read ({exc})") from None
        if len(data) != size:
            raise TinyImageNetError(f"{self.where(rel)}: {len(data)} bytes read, {size} declared")
        return data

    def text(self, rel: str) -> list[tuple[int, str]]:
        """The non-blank lines of a text member with their 1-based line numbers."""
        try:
            text = self.read(rel, MAX_TEXT_BYTES[rel]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TinyImageNetError(f"{self.where(rel)}: not UTF-8 text ({exc})") from None
        return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def _is_image(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_SUFFIXES)


def _wnids(members: _Members) -> list[str]:
    seen: dict[str, int] = {}
    for n, wnid in members.text(WNIDS):
        if "/" in wnid or "\t" in wnid or " " in wnid:
            raise TinyImageNetError(f"{members.where(WNIDS)}:{n}: {wnid!r} is not a WordNet id")
        if wnid in seen:
            raise TinyImageNetError(f"{members.where(WNIDS)}:{n}: {wnid} listed twice (line {seen[wnid]})")
        seen[wnid] = n
    if not seen:
        raise TinyImageNetError(f"{members.where(WNIDS)}: lists no class")
    return sorted(seen)


def _names(members: _Members, wnids: list[str]) -> list[str]:
    wanted, names = set(wnids), {}
    for n, line in members.text(WORDS):
        wnid, sep, words = line.partition("\t")
        if wnid in wanted:
            if not sep or not words.strip():
                raise TinyImageNetError(f"{members.where(WORDS)}:{n}: no name after {wnid}")
            names[wnid] = words.strip()
    absent = [w for w in wnids if w not in names]
    if absent:
        raise TinyImageNetError(f"{members.where(WORDS)}: no line for class {absent[0]} (of {WNIDS})")
    return [names[w] for w in wnids]


def _train(members: _Members, wnids: list[str]) -> list[tuple[str, int]]:
    """``(member, label)`` of every training image; every class has images, every folder is a class."""
    index = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[str, int]] = []
    found: set[str] = set()
    for rel in members.sizes:
        parts = rel.split("/")
        if parts[0] != "train" or len(parts) < 2:
            continue
        wnid = parts[1]
        if wnid not in index:
            raise TinyImageNetError(
                f"{members.where('train/' + wnid)}: a training folder of no class in {WNIDS}"
            )
        if len(parts) == 4 and parts[2] == "images" and _is_image(rel):
            items.append((rel, index[wnid]))
            found.add(wnid)
    empty = [w for w in wnids if w not in found]
    if empty:
        raise TinyImageNetError(
            f"{members.where(f'train/{empty[0]}/images')}: no training image of class {empty[0]}"
        )
    return items


def _val(members: _Members, wnids: list[str]) -> list[tuple[str, int]]:
    """``(member, label)`` of every validation image, from the annotation file, cross-checked."""
    index = {w: i for i, w in enumerate(wnids)}
    where = members.where(ANNOTATIONS)
    images = {rel for rel in members.sizes if rel.startswith("val/images/") and _is_image(rel)}
    items: dict[str, int] = {}
    for n, line in members.text(ANNOTATIONS):
        fields = line.split("\t")
        if len(fields) < 2:
            raise TinyImageNetError(f"{where}:{n}: expected 'file<TAB>wnid<TAB>box', got {line!r}")
        rel = f"val/images/{fields[0]}"
        if "/" in fields[0] or rel not in images:
            raise TinyImageNetError(f"{members.where(rel)}: listed in {where}:{n} but absent")
        if fields[1] not in index:
            raise TinyImageNetError(f"{where}:{n}: class {fields[1]} of {fields[0]} is not in {WNIDS}")
        if rel in items:
            raise TinyImageNetError(f"{where}:{n}: {fields[0]} annotated twice")
        items[rel] = index[fields[1]]
    unannotated = sorted(images - set(items))
    if unannotated:
        raise TinyImageNetError(
            f"{members.where(unannotated[0])}: no line in {where}"
            + (f" (and {len(unannotated) - 1} more images)" if len(unannotated) > 1 else "")
        )
    return sorted(items.items())


@dataclass
class TinyImageNet:
    """A checked Tiny ImageNet archive: wnids (sorted), their names, ``(member, label)`` per split."""

    path: Path
    classes: list[str]
    class_names: list[str]  # the words.txt names of ``classes``
    splits: dict[str, list[tuple[str, int]]]
    default_quality: ClassVar[int] = 95  # only for images that are not JPEG (none in the official zip)

    def notes(self) -> list[str]:
        """Departures from the official archive's counts (a subset is allowed, but said)."""
        out = []
        if len(self.classes) != NUM_CLASSES:
            out.append(f"{len(self.classes)} classes (the official Tiny ImageNet has {NUM_CLASSES})")
        for split, items in self.splits.items():
            if len(items) != STANDARD[split]:
                out.append(f"{split}: {len(items)} images (the official Tiny ImageNet has {STANDARD[split]})")
        return out

    def split_images(self, quality: int) -> Iterator[SplitImages]:
        """``train`` and ``val``, the JPEGs as they are in the archive (the writer re-encodes anything else at
        ``quality``); each split's declared size is checked against :data:`MAX_SPLIT_BYTES` before it is read.
        """
        members = _Members(self.path)
        what = "zip" if self.path.is_file() else "folder"
        try:
            for split, listed in self.splits.items():
                declared = sum(members.sizes.get(rel, 0) for rel, _ in listed)
                if declared > MAX_SPLIT_BYTES:
                    raise TinyImageNetError(
                        f"{members.where(split)}: {len(listed)} images of {declared / 1e9:.1f} GB in all, "
                        f"more than a Tiny ImageNet split holds (the cap: {MAX_SPLIT_BYTES / 1e9:.1f} GB)"
                    )
                items = [(rel, members.read(rel, MAX_IMAGE_BYTES), label) for rel, label in listed]
                yield SplitImages(
                    split,
                    f"{FOLDER}-{split}",
                    items,
                    f"Tiny ImageNet {what} {self.path} ({split}: {len(items)} images)",
                )
                del items  # written: free it before the next split is read
        finally:
            members.close()


def read_tiny_imagenet(path: str | Path) -> TinyImageNet:
    """Check a Tiny ImageNet zip or folder: classes, names, the training tree, the validation annotations.

    Reads the text members only; the images are read when the splits are written
    (:meth:`TinyImageNet.split_images`).
    """
    members = _Members(Path(path))
    try:
        wnids = _wnids(members)
        names = _names(members, wnids)
        splits = {"train": _train(members, wnids), "val": _val(members, wnids)}
    finally:
        members.close()
    return TinyImageNet(Path(path).resolve(), wnids, names, splits)
