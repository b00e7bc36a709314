"""CIFAR-10/100 from the standard python archives into shard sets: ``unmix shards cifar ARCHIVE OUT``.

Reads ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html)
or their extracted folders ``cifar-10-batches-py`` / ``cifar-100-python`` (or a directory holding one):

- CIFAR-10: ``data_batch_1`` .. ``data_batch_5`` (train) and ``test_batch``, each a pickled dict with
  ``data`` (uint8 ``[N, 3072]``: 1024 red, 1024 green, 1024 blue values of a 32x32 image, row-major) and
  ``labels``; class names from ``batches.meta`` (``label_names``).
- CIFAR-100: ``train`` and ``test`` with ``data`` and ``fine_labels``; names from ``meta``
  (``fine_label_names``). The 100 fine classes are the labels (the papers' CIFAR-100 setting).

It writes ``OUT/train`` (the training batches, in archive order) and ``OUT/val`` (the test split) through
:func:`~unmix.pipeline.shards.archives.write_archive_shards`; sample keys are the image's index in its split
(train: ``data_batch_1`` rows first), so every sample traces back to its archive row.

Images are stored as JPEG (the loaders decode JPEG only) at ``quality`` (default 100) with 4:4:4 chroma,
i.e. no chroma subsampling. At quality 100 the quantisation tables are all ones and what is left is the
rounding of the colour conversion and the integer DCT: a decoded pixel differs from the archive's by
about 0.5 grey levels on average and at most 4 (measured on uniform noise, JPEG's worst case; the test
checks these bounds), far below the augmentation's colour jitter. Shards come to ~3-5 KB per image.

The archives are untrusted input, and pickle can run arbitrary code: they are unpickled with an
unpickler that resolves only the globals a pickled array names (numpy's ``_reconstruct``, ``ndarray``,
``dtype``, and ``_codecs.encode``, which protocol-2 pickles use for byte strings), each to a checking
stand-in rather than numpy's own (which take any arguments: uninitialised or gigabyte allocations,
mutated builtin dtypes): an array must be an integer dtype with exactly the bytes its shape needs, copied
from the pickle. Every member's size is capped before it is read (:data:`MAX_BATCH_BYTES`,
:data:`MAX_META_BYTES`). Anything else is refused with an error naming the member.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from unmix.pipeline.shards.archives import SplitImages, encode_jpeg

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

#: Largest archive member read (before reading it): the official CIFAR-100 ``train`` is 161 MB, a
#: CIFAR-10 batch 31 MB, a meta file under 2 KB.
MAX_BATCH_BYTES = 256 * 2**20
MAX_META_BYTES = 2**20
MAX_MEMBERS = 64  # tar members listed before the archive is refused (a header bomb costs memory)
#: The dtypes an array in an archive may have: uint8 images and integer labels (no objects, no records).
ARRAY_DTYPES = frozenset(f"{k}{n}" for k in "iu" for n in (1, 2, 4, 8))


def _text(x: Any) -> Any:
    return x.decode("latin1") if isinstance(x, bytes) else x


class _DType:
    """What ``numpy.dtype(name, align, copy)`` gives inside an archive: a plain integer dtype, nothing else.

    The real constructor returns numpy's shared builtin dtype objects, and the pickle's BUILD then calls
    ``__setstate__`` on them with any state it likes (fields holding objects, another item size): that
    corrupts every array of that dtype in the process and reads memory at chosen addresses. Here the
    state is only checked (a byte order, no fields, no subarray) and never applied.
    """

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        name = _text(name)
        if not isinstance(name, str) or name not in ARRAY_DTYPES:
            raise pickle.UnpicklingError(f"refusing dtype {name!r} (only integer dtypes: images and labels)")
        self.dtype = np.dtype(name)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
            raise pickle.UnpicklingError(f"unexpected dtype state {str(state)[:80]}")
        order = _text(state[1])
        if order not in ("|", "<", ">", "=") or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError(f"refusing dtype state {str(state)[:80]} (byte order, no fields)")
        if order in "<>":
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """What ``_reconstruct(ndarray, (0,), b"b")`` gives: an array that exists only once BUILD has given it
    a shape, an integer dtype and exactly ``prod(shape) * itemsize`` bytes of data (copied from the pickle,
    so never larger than the member, never uninitialised memory)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if self.array is not None:
            raise pickle.UnpicklingError("array state given twice")
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(f"unexpected array state {type(state).__name__}")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError(f"array dtype is a {type(dtype).__name__}, not a numpy dtype")
        if not (
            isinstance(shape, tuple) and len(shape) <= 4 and all(type(n) is int and 0 <= n for n in shape)
        ):
            raise pickle.UnpicklingError(f"bad array shape {str(shape)[:80]}")
        if not isinstance(raw, bytes):
            raise pickle.UnpicklingError(f"array data is a {type(raw).__name__}, not bytes")
        size = dtype.dtype.itemsize
        for n in shape:
            size *= n
        if size != len(raw):
            raise pickle.UnpicklingError(
                f"array {shape} {dtype.dtype} needs {size} bytes, the pickle holds {len(raw)}"
            )
        order = "F" if fortran else "C"
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order=order).copy()


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    """``numpy.core.multiarray._reconstruct`` as pickles of arrays call it, and only so."""
    if cls is not _NDARRAY or shape != (0,) or _text(typecode) != "b":
        raise pickle.UnpicklingError("_reconstruct may only start a plain ndarray (ndarray, (0,), b'b')")
    return _Array()


def _ndarray(*args: Any, **kwargs: Any) -> Any:
    """``numpy.ndarray`` called directly would hand out uninitialised (or arbitrarily large) memory."""
    raise pickle.UnpicklingError("refusing to call numpy.ndarray (arrays come only through _reconstruct)")


_NDARRAY = _ndarray


def _encode(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode(str, "latin1")``, which protocol-2 pickles use for byte strings, and only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only as encode(str, 'latin1')")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # the official archives' name (numpy 1.x)
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): _encode,
}


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild integer numpy arrays, lists, dicts, strings and numbers, and nothing
    else: every global it may name is a checking stand-in (:data:`_ALLOWED`), never numpy's own."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _arrays(value: Any) -> Any:
    """Replace the built stand-ins by their arrays (in the dict's values and lists)."""
    if isinstance(value, _Array):
        if value.array is None:
            raise pickle.UnpicklingError("an array was started but never given its data")
        return value.array
    if isinstance(value, list):
        return [_arrays(v) if isinstance(v, _Array) else v for v in value]
    return value


def safe_load(data: bytes, where: str) -> dict[str, Any]:
    """Unpickle one archive member (Python 2 pickles: ``encoding="bytes"``) into a dict with str keys."""
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
        if not isinstance(obj, dict):
            raise CifarError(f"{where}: expected a pickled dict, got {type(obj).__name__}")
        return {(_text(k) if isinstance(k, bytes) else str(k)): _arrays(v) for k, v in obj.items()}
    except CifarError:
        raise
    except Exception as exc:  # any unpickling failure: truncated member, foreign objects, bad arrays ...
        raise CifarError(f"{where}: cannot unpickle ({type(exc).__name__}: {exc})") from None


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
                infos = []
                for info in self._tar:  # headers only; a CIFAR archive has 8 (CIFAR-10) or 5 members
                    infos.append(info)
                    if len(infos) > MAX_MEMBERS:
                        raise CifarError(
                            f"{path}: more than {MAX_MEMBERS} members; not a CIFAR python archive"
                        )
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

    def _cap(self, name: str, size: int) -> int:
        """The most bytes member ``name`` may have; a larger one is refused before it is read."""
        cap = MAX_META_BYTES if name == self.layout.meta else MAX_BATCH_BYTES
        if size > cap:
            raise CifarError(
                f"{self.where(name)}: {size} bytes, more than any {self.layout.name} member can hold "
                f"({cap} bytes); not a CIFAR archive"
            )
        return cap

    def _read_file(self, name: str) -> bytes:
        p = self.root / name
        if not p.is_file():
            raise CifarError(
                f"{self.where(name)}: missing ({self.layout.name} needs {_expected(self.layout)})"
            )
        cap = self._cap(name, p.stat().st_size)
        with open(p, "rb") as f:
            data = f.read(cap + 1)
        self._cap(name, len(data))  # grew since the stat
        return data

    def _read_member(self, name: str) -> bytes:
        info = self._names.get(f"{self.layout.folder}/{name}")
        if info is None or not info.isfile():
            raise CifarError(
                f"{self.where(name)}: missing ({self.layout.name} needs {_expected(self.layout)})"
            )
        cap = self._cap(name, info.size)  # the size the tar header declares, before anything is read
        f = self._tar.extractfile(info)  # read in memory: nothing is extracted to disk
        try:
            return f.read(cap + 1)
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
    default_quality: ClassVar[int] = 100
    class_names: ClassVar[tuple[str, ...]] = ()  # the classes are names already

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

    def split_images(self, quality: int) -> Iterator[SplitImages]:
        """``train`` and ``val`` (the test split) as JPEG at ``quality``, 4:4:4; a sample's key is its row."""
        for split, (images, labels) in self.splits.items():
            digits = len(str(len(images)))
            yield SplitImages(
                split,
                f"{self.layout.folder}-{split}",
                [
                    (f"{i:0{digits}d}.jpg", encode_jpeg(img, quality), int(lab))
                    for i, (img, lab) in enumerate(zip(images, labels, strict=True))
                ],
                f"{self.layout.name} python archive {self.path} "
                f"({', '.join(Path(m).name for m in self.members[split])}), JPEG quality {quality} 4:4:4",
            )


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
