"""CIFAR-10/100 from the standard python archives into shard sets: ``unmix shards cifar ARCHIVE OUT``.

Reads ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html)
or their extracted folders ``cifar-10-batches-py`` / ``cifar-100-python`` (or a directory holding one):

- CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``, each a pickled dict with
  ``data`` (uint8 ``[N, 3072]``: 1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major) and
  ``labels``; class names from ``batches.meta`` (``label_names``).
- CIFAR-100: ``train`` and ``test`` with ``data`` and ``fine_labels``; names from ``meta``
  (``fine_label_names``). The 100 fine classes are the labels (the papers' CIFAR-100 setting).

It writes ``OUT/train`` (the training batches, in archive order) and ``OUT/val`` (the test split) through
:func:`pipeline.shards.write_shards`; sample keys are the image's index in its split (train:
``data_batch_1`` rows first), so every sample traces back to its archive row.

Images are stored as JPEG (the loaders decode JPEG only) at ``quality`` (default 100) with 4:4:4 chroma,
i.e. no chroma subsampling. At quality 100 the quantisation tables are all ones and what is left is the
rounding of the colour conversion and the integer DCT: a decoded pixel differs from the archive's by
about 0.5 grey levels on average and at most 4 (measured on uniform noise, JPEG's worst case; the test
checks these bounds), far below the augmentation's colour jitter. Shards come to ~3-5 KB per image.

The archives are untrusted input, and pickle can run arbitrary code: they are unpickled with an
unpickler that resolves only the globals numpy needs to rebuild an array (and ``_codecs.encode``, which
protocol-2 pickles use for byte strings); anything else is refused with an error naming the member.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unmix.pipeline.shard_sources import memory_source
from unmix.pipeline.shards import Manifest, write_shards

SIDE = 32  # CIFAR images are 32x32 RGB
ROW = 3 * SIDE * SIDE  # 3072 bytes per image in ``data``


class CifarError(ValueError):
    """The archive is unusable; the message names the archive and the member at fault."""


@dataclass(frozen=True)
class Layout:
    """Where one CIFAR variant keeps its splits, labels and class names."""

    name: str  # "CIFAR-10" | "CIFAR-100"
    folder: str  # the archive's top-level directory
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    names_key: str
    labels_key: str
    num_classes: int
    standard_counts: tuple[int, int]  # images in train / test of the official archive (balanced classes)


CIFAR10 = Layout(
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    ("test_batch",),
    "batches.meta",
    "label_names",
    "labels",
    10,
    (50000, 10000),
)
CIFAR100 = Layout(
    "CIFAR-100",
    "cifar-100-python",
    ("train",),
    ("test",),
    "meta",
    "fine_label_names",
    "fine_labels",
    100,
    (50000, 10000),
)
LAYOUTS = (CIFAR10, CIFAR100)


# ------------------------------------------------------------------------------------------ unpickling


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals an archive may name: numpy's array reconstruction (1.x and 2.x module paths)."""
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    reconstruct = multiarray._reconstruct
    return {
        (
            "numpy.core.multiarray",
            "_reconstruct",
        ): reconstruct,  # the official archives' name
        ("numpy._core.multiarray", "_reconstruct"): reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocol <= 2 pickles bytes as _codecs.encode(str, "latin1")
    }


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, lists, dicts, strings and numbers, and nothing else."""

    allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def safe_load(data: bytes, where: str) -> dict[str, Any]:
    """Unpickle one archive member (Python 2 pickles: ``encoding="bytes"``) into a dict with str keys."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # any unpickling failure: truncated member, foreign objects, ...
        raise CifarError(f"{where}: cannot unpickle ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise CifarError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- reading


class _Members:
    """Read named members of an archive (.tar.gz) or a folder; ``where(name)`` says which for errors."""

    def __init__(self, path: Path):
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._names: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            self.layout, self.root = _detect_folder(path)
            self.read: Callable[[str], bytes] = self._read_file
        elif path.is_file():
            try:
                self._tar = tarfile.open(path, "r:*")
                infos = self._tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise CifarError(f"{path}: not a readable tar archive ({exc})") from None
            self.layout = _detect_members({i.name for i in infos}, path)
            self.root = None
            self._names = {i.name: i for i in infos}
            self.read = self._read_member
        else:
            raise CifarError(f"{path}: no such file or directory")

    def where(self, name: str) -> str:
        if self._tar is not None:
            return f"{self.path}:{self.layout.folder}/{name}"
        return str(self.root / name)

    def _missing(self, name: str) -> CifarError:
        return CifarError(f"{self.where(name)}: missing ({self.layout.name} needs {_expected(self.layout)})")

    def _read_file(self, name: str) -> bytes:
        p = self.root / name
        if not p.is_file():
            raise CifarError(
                f"{self.where(name)}: missing ({self.layout.name} needs {_expected(self.layout)})"
            )
        return p.read_bytes()

    def _read_member(self, name: str) -> bytes:
        info = self._names.get(f"{self.layout.folder}/{name}")
        if info is None or not info.isfile():
            raise CifarError(
                f"{self.where(name)}: missing ({self.layout.name} needs {_expected(self.layout)})"
            )
        f = self._tar.extractfile(info)  # read in memory: nothing is extracted to disk
        try:
            return f.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise CifarError(f"{self.where(name)}: cannot read ({exc})") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def _expected(layout: Layout) -> str:
    return ", ".join((*layout.train, *layout.test, layout.meta))


def _detect_members(names: set[str], path: Path) -> Layout:
    for layout in LAYOUTS:
        if f"{layout.folder}/{layout.meta}" in names:
            return layout
    raise CifarError(
        f"{path}: not a CIFAR python archive (no {CIFAR10.folder}/{CIFAR10.meta} or "
        f"{CIFAR100.folder}/{CIFAR100.meta} inside)"
    )


def _detect_folder(path: Path) -> tuple[Layout, Path]:
    for layout in LAYOUTS:
        for root in (path, path / layout.folder):
            if (root / layout.meta).is_file() and (root / layout.test[0]).exists():
                return layout, root
    raise CifarError(
        f"{path}: not an extracted CIFAR python archive (expected {CIFAR10.folder}/ with {CIFAR10.meta} or "
        f"{CIFAR100.folder}/ with {CIFAR100.meta}, or that folder itself)"
    )


def _batch(members: _Members, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[N, 32, 32, 3]`` uint8 and labels ``[N]`` int64 of one batch member, checked."""
    layout, where = members.layout, members.where(name)
    d = safe_load(members.read(name), where)
    for key in ("data", layout.labels_key):
        if key not in d:
            raise CifarError(f"{where}: no {key!r} entry (keys: {', '.join(sorted(d))})")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise CifarError(f"{where}: 'data' must be a uint8 array [N, {ROW}], got {dtype} {shape}")
    labels = np.asarray(d[layout.labels_key])
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise CifarError(
            f"{where}: {layout.labels_key!r} must be {len(data)} integers (one per row of 'data'), "
            f"got {labels.dtype} {labels.shape}"
        )
    bad = np.flatnonzero((labels < 0) | (labels >= layout.num_classes))
    if bad.size:
        raise CifarError(
            f"{where}: label {int(labels[bad[0]])} of row {int(bad[0])} out of range "
            f"(0..{layout.num_classes - 1})"
        )
    images = data.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1)  # planar RGB rows -> N x H x W x C
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _classes(members: _Members) -> list[str]:
    layout, where = members.layout, members.where(members.layout.meta)
    meta = safe_load(members.read(layout.meta), where)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise CifarError(f"{where}: {layout.names_key!r} must list {layout.num_classes} class names")
    out = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
    if len(set(out)) != len(out):
        raise CifarError(f"{where}: {layout.names_key!r} holds duplicate class names")
    return out


@dataclass
class CifarSplits:
    """A CIFAR archive in memory: class names and (images, labels) per split ("train", "val" = test)."""

    path: Path  # the archive or folder read
    layout: Layout
    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    members: dict[str, list[str]]  # split -> the archive members it came from (for the manifest)

    def notes(self) -> list[str]:
        """Departures from the official archive's counts (a subset is allowed, but said)."""
        out = []
        for split, standard in zip(("train", "val"), self.layout.standard_counts, strict=True):
            labels = self.splits[split][1]
            counts = np.bincount(labels, minlength=self.layout.num_classes)
            if len(labels) != standard or counts.min() != counts.max():
                out.append(
                    f"{split}: {len(labels)} images, {counts.min()}..{counts.max()} per class "
                    f"(the official {self.layout.name} has {standard}, "
                    f"{standard // self.layout.num_classes} per class)"
                )
        return out


def read_cifar(path: str | Path) -> CifarSplits:
    """Read and check a CIFAR-10/100 python archive (``.tar.gz`` or extracted folder)."""
    members = _Members(Path(path))
    try:
        layout = members.layout
        classes = _classes(members)
        splits, names = {}, {}
        for split, batch_names in (("train", layout.train), ("val", layout.test)):
            parts = [_batch(members, n) for n in batch_names]
            splits[split] = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
            names[split] = [members.where(n) for n in batch_names]
    finally:
        members.close()
    train_counts = Counter(splits["train"][1].tolist())
    missing = [classes[c] for c in range(layout.num_classes) if train_counts[c] == 0]
    if missing:
        raise CifarError(
            f"{path}: the training batches hold no image of class(es) {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''} (a truncated or foreign archive?)"
        )
    return CifarSplits(Path(path).resolve(), layout, classes, splits, names)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of one uint8 HWC RGB image, 4:4:4 (no chroma subsampling)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def write_cifar_shards(
    archive: str | Path | CifarSplits,
    out: str | Path,
    *,
    quality: int = 100,
    samples_per_shard: int | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[Manifest, Manifest]:
    """Write ``out/train`` and ``out/val`` (the test split) from a CIFAR archive; returns both manifests.

    ``archive``: a path, or what :func:`read_cifar` returned for it.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    cifar = archive if isinstance(archive, CifarSplits) else read_cifar(archive)
    out = Path(out)
    manifests = []
    for split, (images, labels) in cifar.splits.items():
        digits = len(str(len(images)))
        items = [
            (f"{i:0{digits}d}.jpg", encode_jpeg(img, quality), int(lab))
            for i, (img, lab) in enumerate(zip(images, labels, strict=True))
        ]
        source = memory_source(f"{cifar.layout.folder}-{split}", items, cifar.classes)
        desc = (
            f"{cifar.layout.name} python archive {cifar.path} "
            f"({', '.join(Path(m).name for m in cifar.members[split])}), JPEG quality {quality} 4:4:4"
        )
        manifests.append(
            write_shards(
                source,
                out / split,
                split=split,
                samples_per_shard=samples_per_shard,
                seed=seed,
                quality=quality,
                workers=1,  # the JPEGs are ready: the writer copies them
                overwrite=overwrite,
                progress=progress,
                source_name=desc,
            )
        )
    return manifests[0], manifests[1]
