"""A shard set's manifest: the one module the readers of shard sets import (loaders, training, eval).

A shard set is a directory::

    OUT/<split>-000000.tar   samples <key>.jpg (JPEG bytes) + <key>.cls (class index as ASCII)
    OUT/<split>-000000.idx   DALI's index of that tar (the format ``wds2idx`` writes)
    ...
    OUT/manifest.json        written last: classes, per-shard name/count/bytes/sha256 and the .idx's
                             sha256, the label range, totals, provenance

:func:`read_manifest` is the one thing readers need; it accepts only plain file names beside the
manifest (no ``../``, no absolute paths), and :func:`check_shard_set` is the cheap check every reader
runs first (tar sizes, ``.idx`` sha256: DALI trusts an index's offsets). The full check (tar checksums,
labels, decoding) is :func:`unmix.pipeline.shards.verify.verify_shards`; the writer is
:mod:`unmix.pipeline.shards.writer`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
JOB_FILE = ".unmix-job.json"  # the writer's job description (see unmix.pipeline.shards.plan)
DONE_FILE = ".unmix-done.jsonl"  # the writer's log of finished shards
FORMAT_VERSION = 1


class ManifestError(ValueError):
    """``manifest.json`` is missing or malformed; the message names the file."""


class ShardSetError(ValueError):
    """A shard set cannot be read as its manifest describes (missing directory, manifest, tar or index, or
    a tar whose size differs from the manifest's); the message names the path and what is wrong."""


class ShardWriteError(RuntimeError):
    """Writing shards failed (bad image without ``skip_bad``, foreign OUT, ...); names the culprit."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard: file name, absolute tar and index paths, sample count, tar size and sha256."""

    name: str
    path: Path
    index_path: Path
    count: int
    bytes: int
    sha256: str
    index_sha256: str | None = None  # None: a manifest written before unmix recorded it


@dataclass(frozen=True)
class Manifest:
    """A shard set as described by its ``manifest.json``."""

    root: Path
    split: str
    classes: list[str]
    shards: list[ShardInfo]
    total: int
    seed: int
    source: str
    skipped: int
    version: int
    tool_version: str
    skipped_files: list[str] = field(default_factory=list)
    encoded: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    label_range: tuple[int, int] | None = None  # smallest and largest label written; None: not recorded
    #: False for a set written without labels (STL-10's unlabeled split): its samples hold no ``.cls``
    #: member; pretraining reads it, the evaluation loaders refuse it. ``classes`` then names the classes of
    #: the data set it belongs to, for reference.
    labeled: bool = True
    #: Human-readable names aligned with ``classes`` when those are ids (Tiny ImageNet's wnids; from
    #: ``words.txt``); empty when ``classes`` are names already.
    class_names: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        """Number of classes (labels are ``0 .. num_classes - 1``)."""
        return len(self.classes)

    @property
    def bytes(self) -> int:
        """Total size of the tars in bytes."""
        return sum(s.bytes for s in self.shards)

    @property
    def tar_paths(self) -> list[str]:
        """The tar paths as strings (what ``fn.readers.webdataset(paths=...)`` takes)."""
        return [str(s.path) for s in self.shards]

    @property
    def index_paths(self) -> list[str]:
        """The ``.idx`` paths as strings (``fn.readers.webdataset(index_paths=...)``)."""
        return [str(s.index_path) for s in self.shards]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a shard set: the shard (file name), the sample key if any, what is wrong."""

    shard: str
    key: str | None
    message: str

    def __str__(self) -> str:
        where = self.shard + (f" [{self.key}]" if self.key else "")
        return f"{where}: {self.message}"


def manifest_path(path: str | Path) -> Path:
    """The ``manifest.json`` of ``path``: a shard directory, or the manifest file itself."""
    p = Path(path)
    return p / MANIFEST if p.is_dir() or p.suffix != ".json" else p


def read_manifest(path: str | Path) -> Manifest:
    """Read a shard set's manifest; ``path`` is the shard directory or its ``manifest.json``.

    Raises :class:`ManifestError` naming the file when it is missing, unreadable or malformed.
    """
    mpath = manifest_path(path)
    if not mpath.is_file():
        hint = (
            " (an unfinished write? run the same `unmix shards write` again)"
            if (mpath.parent / JOB_FILE).exists()
            else ""
        )
        raise ManifestError(f"no shard manifest at {mpath}{hint}")
    try:
        d = json.loads(mpath.read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read shard manifest {mpath}: {e}") from e
    try:
        if not isinstance(d, dict):
            raise ManifestError(f"malformed shard manifest {mpath}: a JSON {type(d).__name__}, not an object")
        if d.get("format") != "unmix-webdataset":
            raise ManifestError(f"{mpath} is not an unmix shard manifest (format={d.get('format')!r})")
        if int(d["version"]) > FORMAT_VERSION:
            raise ManifestError(
                f"{mpath} has format version {d['version']}; this unmix reads <= {FORMAT_VERSION}"
            )
        root = mpath.parent.resolve()
        if not isinstance(d["shards"], list) or not all(isinstance(s, dict) for s in d["shards"]):
            raise ManifestError(f"malformed shard manifest {mpath}: 'shards' must be a list of objects")
        shards = [
            ShardInfo(
                name=_own_name(mpath, f"shards[{i}].name", s["name"], ".tar"),
                path=root / s["name"],
                index_path=root / _own_name(mpath, f"shards[{i}].index", s["index"], ".idx"),
                count=int(s["count"]),
                bytes=int(s["bytes"]),
                sha256=str(s["sha256"]),
                index_sha256=str(s["index_sha256"]) if s.get("index_sha256") is not None else None,
            )
            for i, s in enumerate(d["shards"])
        ]
        if not isinstance(d["classes"], list) or not all(isinstance(c, str) for c in d["classes"]):
            raise ManifestError(f"malformed shard manifest {mpath}: 'classes' must be a list of names")
        label_range = None
        if d.get("label_range") is not None:
            lo, hi = (int(v) for v in d["label_range"])
            if not 0 <= lo <= hi < len(d["classes"]):
                raise ManifestError(
                    f"malformed shard manifest {mpath}: label_range {[lo, hi]} is not within "
                    f"0..{len(d['classes']) - 1} (its {len(d['classes'])} classes)"
                )
            label_range = (lo, hi)
        return Manifest(
            root=root,
            split=str(d["split"]),
            classes=list(d["classes"]),
            shards=shards,
            total=int(d["total"]),
            seed=int(d["seed"]),
            source=str(d["source"]),
            skipped=int(d["skipped"]),
            version=int(d["version"]),
            tool_version=str(d["tool_version"]),
            skipped_files=[str(f) for f in d.get("skipped_files", [])],
            encoded={str(k): int(v) for k, v in dict(d.get("encoded", {})).items()},
            options=dict(d.get("options", {})),
            label_range=label_range,
            labeled=_manifest_bool(d.get("labeled", True), mpath, "labeled"),
            class_names=[str(c) for c in d.get("class_names", [])],
        )
    except ManifestError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ManifestError(f"malformed shard manifest {mpath}: {type(e).__name__}: {e}") from e


_OWN_NAME = re.compile(r"[^/\\\x00-\x1f\x7f]+")  # one path component, no control characters


def is_plain_name(name: Any) -> bool:
    """``name`` is one path component (no ``/``, no ``..``, no control characters): a file beside the
    manifest, never a path to data elsewhere."""
    return isinstance(name, str) and bool(_OWN_NAME.fullmatch(name)) and name not in (".", "..")


def _own_name(mpath: Path, key: str, name: Any, suffix: str) -> str:
    """``name`` if it is a plain file name in the manifest's directory ending in ``suffix``; a manifest may
    not point at data elsewhere (``../``, absolute paths, sub-directories)."""
    if not is_plain_name(name) or not name.endswith(suffix):
        raise ManifestError(
            f"{mpath}: {key} {name!r} is not a {suffix} file name in the manifest's directory "
            "(no paths: a manifest describes only the files beside it)"
        )
    return name


def _manifest_bool(value: Any, mpath: Path, key: str) -> bool:
    if not isinstance(value, bool):
        raise ManifestError(f"malformed shard manifest {mpath}: {key!r} must be true or false, got {value!r}")
    return value


def shard_set_problems(m: Manifest) -> list[Problem]:
    """Cheap checks of a shard set against its manifest: every tar present with the manifest's size, every
    ``.idx`` present and, where the manifest records it, with its sha256 (DALI trusts an index's offsets:
    a tampered one crashes the reader). No tar checksums, no decoding: that is
    :func:`unmix.pipeline.shards.verify.verify_shards`."""
    problems = []
    verify = f"run `unmix shards verify {m.root}`"
    for s in m.shards:
        if not s.path.is_file():
            problems.append(Problem(s.name, None, f"tar {s.path} is missing"))
            continue
        size = s.path.stat().st_size
        if size != s.bytes:
            problems.append(
                Problem(
                    s.name,
                    None,
                    f"tar {s.path} does not match its manifest: {size} bytes, the manifest says {s.bytes} "
                    f"(truncated or changed); {verify}",
                )
            )
        if not s.index_path.is_file():
            problems.append(
                Problem(
                    s.name,
                    None,
                    f"index {s.index_path} of shard {s.name} is missing (write the set again with "
                    "`unmix shards write`, or re-create it with DALI's wds2idx)",
                )
            )
        elif s.index_sha256 is not None and sha256_file(s.index_path) != s.index_sha256:
            problems.append(
                Problem(
                    s.name,
                    None,
                    f"index {s.index_path} does not match its manifest (sha256 differs: changed or "
                    f"damaged; DALI would read wrong offsets); {verify}",
                )
            )
    return problems


_NOTICED: set[Path] = set()


def legacy_notice(m: Manifest) -> str | None:
    """The one-line notice for a manifest written before unmix recorded ``.idx`` checksums, else None."""
    if all(s.index_sha256 is not None for s in m.shards):
        return None
    return (
        f"note: {m.root / MANIFEST} records no .idx checksums (written by an older unmix): the indices are "
        f"checked for presence only; `unmix shards verify --fix {m.root}` checks the set and records them"
    )


def check_shard_set(path: str | Path, key: str | None = None) -> Manifest:
    """The manifest of the shard set at ``path`` after the cheap checks of :func:`shard_set_problems`.

    Raises :class:`ShardSetError` with a one-line message naming the path (prefixed with ``key``, e.g.
    ``data.train``, when given) and what is wrong: the directory missing or a file, the manifest missing or
    unreadable, a tar missing or of another size than the manifest says, an index missing or (where the
    manifest records it) with another sha256. A manifest without index checksums is accepted with a
    one-line notice on stderr (:func:`legacy_notice`).
    """
    p = Path(path)
    where = f"{key}={path}" if key else str(path)
    if not p.exists():
        rel = (
            "" if p.is_absolute() else f" (relative paths are relative to the working directory {Path.cwd()})"
        )
        raise ShardSetError(f"{where}: no such directory{rel}")
    if p.is_file() and p.name != MANIFEST:
        raise ShardSetError(f"{where}: is a file, not a shard directory (one with manifest.json)")
    try:
        m = read_manifest(p)
    except ManifestError as e:
        raise ShardSetError(f"{where}: {e}") from e
    problems = shard_set_problems(m)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ShardSetError(f"{where}: {problems[0].message}{more}")
    notice = legacy_notice(m)
    if notice and m.root not in _NOTICED and os.environ.get("RANK", "0") == "0":  # once per set, rank 0
        _NOTICED.add(m.root)
        print(f"unmix: {notice}", file=sys.stderr)
    return m


def _manifest_dict(m: Manifest) -> dict[str, Any]:
    return {
        "format": "unmix-webdataset",
        "version": m.version,
        "tool_version": m.tool_version,
        "split": m.split,
        "classes": m.classes,
        "num_classes": m.num_classes,
        "total": m.total,
        "bytes": m.bytes,
        "seed": m.seed,
        "source": m.source,
        "skipped": m.skipped,
        "skipped_files": m.skipped_files,
        "encoded": m.encoded,
        "options": m.options,
        "label_range": list(m.label_range) if m.label_range is not None else None,
        "labeled": m.labeled,
        **({"class_names": m.class_names} if m.class_names else {}),
        "shards": [
            {
                "name": s.name,
                "index": s.index_path.name,
                "count": s.count,
                "bytes": s.bytes,
                "sha256": s.sha256,
                "index_sha256": s.index_sha256,
            }
            for s in m.shards
        ],
    }


def write_manifest(m: Manifest) -> None:
    """Write ``m`` as ``m.root/manifest.json`` (atomically: a reader sees the old or the new file)."""
    atomic_write_text(m.root / MANIFEST, json.dumps(_manifest_dict(m), indent=1) + "\n")


def atomic_write_text(path: Path, text: str, sync: bool = True) -> None:
    """Write ``text`` to ``path`` through ``path.partial`` and a rename: a reader sees the old file or the
    new one, never a part. ``sync``: fsync before the rename."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()
