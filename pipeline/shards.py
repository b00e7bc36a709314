"""WebDataset shards for DALI: write them from an image tree, read their manifest, verify them.

A shard set is a directory::

    OUT/<split>-000000.tar   samples <key>.jpg (JPEG bytes) + <key>.cls (class index as ASCII)
    OUT/<split>-000000.idx   DALI's index of that tar (the format ``wds2idx`` writes)
    ...
    OUT/manifest.json        written last: classes, per-shard name/count/bytes/sha256 and the .idx's
                             sha256, the label range, totals, provenance

``read_manifest`` is the one thing readers need; it accepts only plain file names beside the manifest
(no ``../``, no absolute paths), and :func:`check_shard_set` is the cheap check every reader runs first
(tar sizes, ``.idx`` sha256: DALI trusts an index's offsets). Samples are shuffled globally at write
time (DALI only shuffles inside a buffer); a sample's key is the zero-padded index of its source file in
the sorted source list, so every sample can be traced back to its file.

Crash safety: each tar and index is written as ``*.partial`` and renamed when complete; a finished shard
is recorded in ``OUT/.unmix-done.jsonl`` with its sha256; ``manifest.json`` appears (atomically) only
when every shard is done. ``OUT/.unmix-job.json`` describes the job (the sorted file list with labels
and sizes, seed, sizing, encoding options), so re-running the same job after an interruption keeps the
recorded shards whose checksums still match and rewrites the rest; the shard assignment depends only on
that description, so the result is byte-identical to an uninterrupted run. ``overwrite`` replaces
another job's set by deleting only the files that job wrote (its manifest's and progress log's lists).
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import signal
import sys
import tarfile
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unmix.pipeline.class_subset import keep_classes as subset_classes
from unmix.pipeline.class_subset import read_class_file
from unmix.pipeline.dali_index import Member, format_index
from unmix.pipeline.image_prep import Prepared, PrepSettings, prepare_chunk
from unmix.pipeline.shard_sources import Source, SourceError, SourceItem, read_list, scan_tree

MANIFEST = "manifest.json"
JOB_FILE = ".unmix-job.json"
DONE_FILE = ".unmix-done.jsonl"
FORMAT_VERSION = 1
DEFAULT_SAMPLES_PER_SHARD = 1000
KEY_DIGITS = 8
#: Test hook: the writer SIGKILLs itself after writing this many samples (simulates a crash mid-shard).
KILL_AFTER_ENV = "UNMIX_SHARDS_TEST_KILL_AFTER"

__all__ = [
    "Manifest",
    "ShardInfo",
    "Problem",
    "ManifestError",
    "ShardWriteError",
    "SourceError",
    "read_manifest",
    "check_shard_set",
    "shard_set_problems",
    "ShardSetError",
    "write_shards",
    "verify_shards",
]


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


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("unmix")
    except Exception:
        return "0+unknown"


# --------------------------------------------------------------------------------------------- manifest


def _manifest_path(path: str | Path) -> Path:
    p = Path(path)
    return p / MANIFEST if p.is_dir() or p.suffix != ".json" else p


def read_manifest(path: str | Path) -> Manifest:
    """Read a shard set's manifest; ``path`` is the shard directory or its ``manifest.json``.

    Raises :class:`ManifestError` naming the file when it is missing, unreadable or malformed.
    """
    mpath = _manifest_path(path)
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


def _own_name(mpath: Path, key: str, name: Any, suffix: str) -> str:
    """``name`` if it is a plain file name in the manifest's directory ending in ``suffix``; a manifest may
    not point at data elsewhere (``../``, absolute paths, sub-directories)."""
    if (
        not isinstance(name, str)
        or not _OWN_NAME.fullmatch(name)
        or name in (".", "..")
        or not name.endswith(suffix)
    ):
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
    a tampered one crashes the reader). No tar checksums, no decoding: that is :func:`verify_shards`."""
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
    _atomic_write_text(m.root / MANIFEST, json.dumps(_manifest_dict(m), indent=1) + "\n")


def _atomic_write_text(path: Path, text: str, sync: bool = True) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ planning


def _plan_shards(
    items: list[SourceItem], seed: int, samples_per_shard: int | None, shard_bytes: int | None
) -> list[list[int]]:
    """Shuffle the item indices with ``seed`` and cut them into shards (lists of indices into ``items``).

    With ``shard_bytes`` the cut uses each sample's tar footprint estimated from its *source* file size,
    so it is known before anything is encoded (re-encoded shards come out smaller than the target).
    """
    order = np.random.default_rng(seed).permutation(len(items)).tolist()
    shards: list[list[int]] = [[]]
    size = 0
    for i in order:
        est = 512 + (items[i].size + 511) // 512 * 512 + 1024  # jpg header+data, cls header+data
        full_count = samples_per_shard is not None and len(shards[-1]) >= samples_per_shard
        full_bytes = shard_bytes is not None and shards[-1] and size + est > shard_bytes
        if full_count or full_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += est
    return shards


def _job_description(
    source: Source, split: str, seed: int, spp: int | None, shard_bytes: int | None, settings: PrepSettings
) -> dict[str, Any]:
    h = hashlib.sha256()
    for it in source.items:
        h.update(f"{it.rel}\0{it.label}\0{it.size}\n".encode())
    return {
        "files": len(source.items),
        "files_sha256": h.hexdigest(),
        "classes_sha256": hashlib.sha256("\n".join(source.classes).encode()).hexdigest(),
        "split": split,
        "seed": seed,
        "samples_per_shard": spp,
        "shard_bytes": shard_bytes,
        "quality": settings.quality,
        "max_side": settings.max_side,
        "format_version": FORMAT_VERSION,
    }


_BOOKKEEPING = (MANIFEST, JOB_FILE, DONE_FILE)


def _json_or_none(path: Path | str) -> Any:
    """The JSON value of a file (a ``Path``) or of a text (a ``str``); None when unreadable."""
    try:
        return json.loads(path.read_text() if isinstance(path, Path) else path)
    except (OSError, ValueError):
        return None


def _replaced_files(out: Path) -> set[str]:
    """Names of the files in ``out`` that the shard job there wrote: its manifest's shards and indices,
    the shards its progress log records, their ``.partial`` files, and its bookkeeping files. Nothing
    else in ``out`` (another split's shards, a user's files) is the job's to replace."""
    old_job = _json_or_none(out / JOB_FILE)
    if not isinstance(old_job, dict):
        return set()  # no job of ours here: nothing is ours to delete
    names: set[str] = set()
    manifest = _json_or_none(out / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == "unmix-webdataset":
        for s in manifest.get("shards") or []:
            if isinstance(s, dict):
                names.update(str(s.get(k)) for k in ("name", "index"))
    done = out / DONE_FILE
    if done.is_file():
        for line in done.read_text(errors="replace").splitlines():
            rec = _json_or_none(line)
            if isinstance(rec, dict) and isinstance(rec.get("name"), str):
                names.update((rec["name"], str(Path(rec["name"]).with_suffix(".idx"))))
    split = old_job.get("split")
    if isinstance(split, str) and re.fullmatch(r"[A-Za-z0-9_]+", split):
        partial = re.compile(rf"{split}-\d{{6}}\.(tar|idx)\.partial")
        names.update(e.name for e in os.scandir(out) if partial.fullmatch(e.name))
    names = {n for n in names if _OWN_NAME.fullmatch(n) and n not in (".", "..")}  # never a path
    names.update(_BOOKKEEPING)
    return names | {n + ".partial" for n in names}


def _skipped_so_far(out: Path) -> list[str]:
    """Source files the job in ``out`` skipped as bad so far (its finished shards' records)."""
    path, skipped = out / DONE_FILE, []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                skipped += json.loads(line).get("skipped", [])
            except (ValueError, AttributeError):
                continue
    return sorted(set(skipped))


def _prepare_out(out: Path, job: dict[str, Any], overwrite: bool, names: list[str]) -> bool:
    """Create/claim ``out``; return True when it holds this very job (resume), False for a fresh start.

    ``names``: the shard tars this job writes. ``overwrite`` deletes only the files the job it replaces
    wrote (:func:`_replaced_files`), and refuses when this job would replace any other file in ``out``.

    ``job["skip_bad"]`` (present only when true) is part of the identity with one allowance: a job written
    without it skipped nothing, so ``--skip-bad`` may resume or accept it; the other way round is refused
    when the set skipped bad inputs (this command would have failed on them).
    """
    if out.exists() and not out.is_dir():
        raise ShardWriteError(f"output {out} exists and is not a directory; give a directory path for OUT")
    out.mkdir(parents=True, exist_ok=True)
    entries = [e for e in os.scandir(out)]
    job_path = out / JOB_FILE
    if job_path.exists() and not overwrite:
        try:
            old = json.loads(job_path.read_text())
        except ValueError:
            old = None
        if old == job:
            return True
        if isinstance(old, dict) and {k: v for k, v in old.items() if k != "skip_bad"} == {
            k: v for k, v in job.items() if k != "skip_bad"
        }:
            skipped = _skipped_so_far(out) if old.get("skip_bad") else []
            if skipped:
                raise ShardWriteError(
                    f"{out} holds this job written with --skip-bad, which skipped {len(skipped)} bad "
                    f"input(s) (first: {skipped[0]}); run with --skip-bad to accept that, or fix the inputs "
                    "and use --overwrite to write the set again"
                )
            _atomic_write_text(job_path, json.dumps(job, indent=1, sort_keys=True) + "\n")
            return True
    if entries and not overwrite:
        what = "a different shard job" if job_path.exists() else "files that are not from this job"
        raise ShardWriteError(
            f"output directory {out} is not empty and holds {what}; "
            "use another directory or --overwrite (deletes its shards and manifest)"
        )
    replaced = _replaced_files(out)
    ours = set(_BOOKKEEPING) | {n for t in names for n in (t, str(Path(t).with_suffix(".idx")))}
    ours |= {n + ".partial" for n in ours}
    clash = sorted(e.name for e in entries if e.name in ours and e.name not in replaced)
    if clash:
        raise ShardWriteError(
            f"{out / clash[0]} exists and was not written by the shard job {out} holds; --overwrite "
            f"replaces only that job's files ({len(clash)} file(s) in the way: move them or use another OUT)"
        )
    for e in entries:
        if e.name in replaced and not e.is_dir(follow_symlinks=False):
            os.unlink(e.path)
    _atomic_write_text(job_path, json.dumps(job, indent=1, sort_keys=True) + "\n")
    return False


# ------------------------------------------------------------------------------------------- writing


def _tar_header(name: str, size: int) -> bytes:
    """A 512-byte ustar header for a regular file: mode 0644, uid/gid 0, mtime 0 (reproducible shards).

    Built directly (``tarfile.TarInfo.tobuf`` costs ~0.1 ms, a fifth of the per-image budget); the bytes
    are identical to ``TarInfo.tobuf(USTAR_FORMAT)`` for the same fields (tested).
    """
    n = name.encode()
    if len(n) > 100:
        raise ValueError(f"tar member name too long for ustar: {name}")
    h = bytearray(512)
    h[0 : len(n)] = n
    h[100:148] = b"0000644\x000000000\x000000000\x00%011o\x0000000000000\x00" % size
    h[148:156] = b"        "  # checksum field counts as spaces
    h[156] = 0x30  # regular file
    h[257:265] = b"ustar\x0000"
    h[148:156] = b"%06o\x00 " % sum(h)
    return bytes(h)


class _Sink(threading.Thread):
    """Hashes and writes buffers in a background thread, in order (both release the GIL, so this runs
    beside the main thread's reading and bookkeeping). At most ``depth`` buffers wait."""

    def __init__(self, depth: int = 64):
        super().__init__(name="shard-writer", daemon=True)
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        while True:
            job = self.q.get()
            try:
                if job is None:
                    return
                if self.error is None:
                    job[0](job[1])
            except BaseException as e:  # re-raised in the main thread by submit/drain
                self.error = e
            finally:
                self.q.task_done()

    def submit(self, fn: Any, arg: Any) -> None:
        if self.error is not None:
            raise self.error
        self.q.put((fn, arg))

    def drain(self) -> None:
        """Wait until everything submitted is done; re-raise its error if any."""
        self.q.join()
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.q.put(None)
        self.join()


class _ShardTar:
    """One tar being written as ``<name>.partial``, hashed on the fly; records member offsets for the index.

    Members are written directly (header, data, zero padding to 512), one buffer per sample handed to a
    :class:`_Sink`; the bytes are identical to what ``tarfile`` writes in ustar format.
    """

    def __init__(self, path: Path, sink: _Sink):
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.file = open(self.partial, "wb")
        self.sha = hashlib.sha256()
        self.sink = sink
        self.pos = 0
        self.members: list[Member] = []
        self.count = 0

    def _write_now(self, b: bytes) -> None:  # in the sink's thread
        self.sha.update(b)
        self.file.write(b)

    def _write(self, parts: list[bytes]) -> None:
        b = b"".join(parts)
        self.pos += len(b)
        self.sink.submit(self._write_now, b)

    def add(self, key: str, jpg: bytes, label: int | None) -> None:
        """Append one sample: ``<key>.jpg`` and ``<key>.cls`` (none when ``label`` is None: unlabeled set)."""
        parts = []
        pos = self.pos
        members = [(f"{key}.jpg", jpg)] + ([] if label is None else [(f"{key}.cls", str(label).encode())])
        for name, data in members:
            pad = -len(data) % tarfile.BLOCKSIZE
            self.members.append(Member(name, pos + tarfile.BLOCKSIZE, len(data)))
            parts += [_tar_header(name, len(data)), data, b"\0" * pad]
            pos += tarfile.BLOCKSIZE + len(data) + pad
        self._write(parts)
        self.count += 1

    def flush(self) -> None:
        self.sink.drain()
        self.file.flush()

    def finish(self) -> tuple[int, str, str]:
        """End the archive, write the index, rename both into place; returns (bytes, sha256, index text).

        Not fsynced here (that would stall the writer once per shard): ``write_shards`` syncs every file
        before it writes the manifest, and a resume re-checks each recorded shard's sha256 anyway.
        """
        end = self.pos + 2 * tarfile.BLOCKSIZE
        self._write([b"\0" * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE))])
        self.sink.drain()
        self.file.close()
        index_text = format_index(self.members)
        _atomic_write_text(self.path.with_suffix(".idx"), index_text, sync=False)
        os.replace(self.partial, self.path)
        return self.pos, self.sha.hexdigest(), index_text

    def abandon(self) -> None:
        try:
            self.sink.drain()
        except BaseException:
            pass  # already failing; the partial file goes anyway
        self.file.close()
        self.partial.unlink(missing_ok=True)


def _fsync_paths(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _worker_init() -> None:
    # Die with the writer (a SIGKILLed writer must not leave workers behind) and leave Ctrl-C to it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except Exception:
            pass


class _PreparedStream:
    """Prepared images in task order; with ``workers > 1`` from a process pool, a few chunks ahead.

    The pool is forked here, before the writer starts any thread of its own.
    """

    def __init__(
        self,
        tasks: list[tuple[int, str, bytes | None]],
        settings: PrepSettings,
        workers: int,
        chunk: int = 32,
    ):
        self.chunks = [tasks[i : i + chunk] for i in range(0, len(tasks), chunk)]
        self.settings = settings
        self.workers = workers
        self.pool = None
        if workers > 1 and len(self.chunks) > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            self.pool = ctx.Pool(workers, initializer=_worker_init)
        self._it = self._generate()

    def _generate(self) -> Iterator[Prepared]:
        if self.pool is None:
            for c in self.chunks:
                yield from prepare_chunk(c, self.settings)
            return
        pending: deque = deque()
        it = iter(self.chunks)
        for c in it:
            pending.append(self.pool.apply_async(prepare_chunk, (c, self.settings, False)))
            if len(pending) >= 4 * self.workers:
                break
        while pending:
            done = pending.popleft().get()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self.pool.apply_async(prepare_chunk, (nxt, self.settings, False)))
            yield from done

    def __next__(self) -> Prepared:
        return next(self._it)

    def close(self) -> None:
        self._it.close()
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()
            self.pool = None


def _read_copy(item: SourceItem) -> bytes:
    """The bytes of a JPEG a worker validated for copying (it sends only the verdict back)."""
    if item.data is not None:
        return item.data
    with open(item.path, "rb") as f:
        return f.read()


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _load_done(out: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """Recorded finished shards whose tar and index still match their checksums."""
    done: dict[str, dict[str, Any]] = {}
    path = out / DONE_FILE
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a torn last line from a crash
        if rec.get("name") in names:
            done[rec["name"]] = rec
    kept = {}
    for name, rec in done.items():
        if rec.get("count") == 0:  # every image of that shard was bad: no files to check
            kept[name] = rec
            continue
        tar, idx = out / name, (out / name).with_suffix(".idx")
        if (
            tar.is_file()
            and idx.is_file()
            and tar.stat().st_size == rec["bytes"]
            and sha256_file(tar) == rec["sha256"]
            and hashlib.sha256(idx.read_bytes()).hexdigest() == rec["index_sha256"]
        ):
            kept[name] = rec
    return kept


def available_cpus() -> int:
    """CPUs this process may run on (respects Slurm/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _default_split(out: Path) -> str:
    name = re.sub(r"[^A-Za-z0-9_]+", "_", out.resolve().name).strip("_")
    return name or "data"


def write_shards(
    src: str | Path | Source,
    out: str | Path,
    *,
    list_file: str | Path | None = None,
    classes_from: str | Path | None = None,
    split: str | None = None,
    samples_per_shard: int | None = None,
    shard_bytes: int | None = None,
    seed: int = 0,
    quality: int = 95,
    max_side: int | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    source_name: str | None = None,
    keep_classes: str | Path | None = None,
    labeled: bool = True,
    class_names: list[str] | None = None,
) -> Manifest:
    """Convert an image tree (or a list file) into shuffled WebDataset shards with DALI indices.

    Args:
        src: ImageFolder root ``src/<class>/<image>``; with ``list_file``, the root its paths are relative to;
            or a ready :class:`~unmix.pipeline.shard_sources.Source` (e.g. ``memory_source``, used by the
            samples).
        out: output directory (created). Re-running the same job there resumes it.
        list_file: ``relative/path,label`` lines instead of the class directories.
        classes_from: another shard set (dir or manifest.json) whose class mapping to use.
        split: shard name prefix (``<split>-000000.tar``); default: ``out``'s directory name.
        samples_per_shard: samples per shard (default 1000 unless ``shard_bytes`` is given).
        shard_bytes: cut shards at about this many bytes (estimated from source file sizes).
        seed: global shuffle seed; same inputs + seed give byte-identical shards.
        quality: JPEG quality for images that are (re-)encoded.
        max_side: re-encode images whose longer side exceeds this, scaled down to it.
        workers: processes preparing images (default: the CPUs available); 1 = all in this process.
        skip_bad: skip unreadable/corrupt images (counted in the manifest) instead of failing.
        overwrite: allow replacing a different job's shards in ``out``.
        progress: show a progress bar and print a summary on stderr.
        source_name: what the manifest records as the source (default: ``src``'s absolute path).
        keep_classes: a class list file (``--classes``, :mod:`unmix.pipeline.class_subset`): only these
            classes are written, indexed in sorted order (or by ``classes_from``).
        labeled: False writes no ``.cls`` members and a manifest saying the set has no labels (the
            source's labels are ignored; its classes are recorded for reference).
        class_names: human-readable names aligned with the source's classes, recorded in the manifest.

    Returns:
        The manifest of the finished set (also written to ``out/manifest.json``).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if shard_bytes is not None and shard_bytes < 4096:
        raise ValueError(f"shard_bytes must be >= 4096, got {shard_bytes}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if samples_per_shard is None and shard_bytes is None:
        samples_per_shard = DEFAULT_SAMPLES_PER_SHARD
    if isinstance(src, Source):
        if list_file is not None or classes_from is not None or keep_classes is not None:
            raise ValueError(
                "list_file, classes_from and keep_classes apply to a source directory, not a ready Source"
            )
        source = src
    else:
        src = Path(src)
        if out.resolve().is_relative_to(src.resolve()):  # every mode: --list too
            same = " (it is the source directory)" if out.resolve() == src.resolve() else ""
            raise ValueError(f"output directory {out} must not be inside the source tree {src}{same}")
        classes = read_manifest(classes_from).classes if classes_from is not None else None
        keep = read_class_file(keep_classes) if keep_classes is not None else None
        if list_file is not None:
            source = read_list(src, Path(list_file), classes)
            if keep is not None:
                source = subset_classes(source, keep, str(keep_classes), classes)
        else:
            source = scan_tree(src, classes, keep)
    if class_names is not None and len(class_names) != len(source.classes):
        raise ValueError(f"class_names: {len(class_names)} names for {len(source.classes)} classes")
    if source.links_skipped or source.aliases:  # said even with progress off: the set differs from the tree
        first = f": {source.links_skipped[0]}" if source.links_skipped else ""
        print(
            f"unmix shards write: note: {len(source.links_skipped)} directory link(s) in {source.root} not "
            f"followed{first}; {source.aliases} file(s) reached twice in one class kept once",
            file=sys.stderr,
        )
    split = split or _default_split(out)
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r} must be letters, digits and '_' (it prefixes shard names)")
    settings = PrepSettings(quality=quality, max_side=max_side)
    workers = available_cpus() if workers is None else workers

    job = _job_description(source, split, seed, samples_per_shard, shard_bytes, settings)
    if skip_bad:  # part of the job's identity (absent when false: sets written before stay the same job)
        job["skip_bad"] = True
    if not labeled:  # likewise: a labelled set and an unlabeled one of the same images are different jobs
        job["labeled"] = False
    plan = _plan_shards(source.items, seed, samples_per_shard, shard_bytes)
    names = [f"{split}-{i:06d}.tar" for i in range(len(plan))]
    resuming = _prepare_out(out, job, overwrite, names)
    options = {
        "samples_per_shard": samples_per_shard,
        "shard_bytes": shard_bytes,
        "quality": quality,
        "max_side": max_side,
        "list_file": str(Path(list_file).resolve()) if list_file else None,
        "classes_from": str(_manifest_path(classes_from).resolve()) if classes_from else None,
        "links_not_followed": source.links_skipped[:20],
        "aliases_kept_once": source.aliases,
        **({"classes_file": str(Path(keep_classes).resolve())} if keep_classes is not None else {}),
    }
    if resuming and (out / MANIFEST).exists():
        try:
            m = read_manifest(out)
            if all(s.path.is_file() and s.path.stat().st_size == s.bytes for s in m.shards):
                if progress:
                    bad = f", {m.skipped} bad input(s) skipped when written" if m.skipped else ""
                    print(
                        f"{out}: already complete ({m.total} images in {len(m.shards)} shards{bad})",
                        file=sys.stderr,
                    )
                return m
        except ManifestError:
            pass
    (out / MANIFEST).unlink(missing_ok=True)
    kept = _load_done(out, set(names)) if resuming else {}
    for f in out.glob("*.partial"):
        f.unlink()
    if not resuming:
        (out / DONE_FILE).unlink(missing_ok=True)

    todo = [i for i, n in enumerate(names) if n not in kept]
    tasks = [(k, source.items[k].path, source.items[k].data) for i in todo for k in plan[i]]
    kill_after = int(os.environ.get(KILL_AFTER_ENV, "0") or 0)
    written = 0
    records: dict[str, dict[str, Any]] = dict(kept)
    encoded_now: Counter[str] = Counter()  # this run's work only (the summary); the manifest counts all

    from tqdm import tqdm

    stream = _PreparedStream(tasks, settings, max(1, workers))  # forks before any thread starts
    bar = tqdm(
        total=len(source.items),
        initial=sum(r["count"] + len(r["skipped"]) for r in kept.values()),
        unit="img",
        desc=f"shards {out.name}",
        disable=not progress,
        file=sys.stderr,
    )
    sink = _Sink()
    try:
        with open(out / DONE_FILE, "a") as done_log:
            for i in todo:
                shard = _ShardTar(out / names[i], sink)
                skipped: list[str] = []
                actions: Counter[str] = Counter()
                try:
                    for k in plan[i]:
                        p = next(stream)
                        assert p.index == k
                        item = source.items[k]
                        bar.update(1)
                        if p.error is not None:
                            if not skip_bad:
                                raise ShardWriteError(f"bad image {item.path}: {p.error}")
                            skipped.append(item.rel)
                            continue
                        data = p.data if p.data is not None else _read_copy(item)
                        assert p.action is not None
                        shard.add(f"{k:0{KEY_DIGITS}d}", data, item.label if labeled else None)
                        actions[p.action] += 1
                        encoded_now[p.action] += 1
                        written += 1
                        if kill_after and written >= kill_after:
                            shard.flush()
                            os.kill(os.getpid(), signal.SIGKILL)
                    if shard.count == 0:
                        shard.abandon()  # every image of this shard was bad
                        rec = {"name": names[i], "count": 0, "skipped": skipped, "actions": {}}
                    else:
                        nbytes, sha, index_text = shard.finish()
                        rec = {
                            "name": names[i],
                            "count": shard.count,
                            "bytes": nbytes,
                            "sha256": sha,
                            "index_sha256": hashlib.sha256(index_text.encode()).hexdigest(),
                            "skipped": skipped,
                            "actions": dict(actions),
                        }
                except BaseException:
                    shard.abandon()
                    raise
                records[names[i]] = rec
                done_log.write(json.dumps(rec) + "\n")
                done_log.flush()
    finally:
        bar.close()
        stream.close()
        sink.close()

    out_res = out.resolve()
    shards = [
        ShardInfo(
            n,
            out_res / n,
            out_res / Path(n).with_suffix(".idx"),
            r["count"],
            r["bytes"],
            r["sha256"],
            r["index_sha256"],
        )
        for n in names
        if (r := records[n])["count"] > 0
    ]
    encoded: Counter[str] = Counter()
    for r in records.values():
        encoded.update(r["actions"])
    skipped_files = sorted(f for r in records.values() for f in r["skipped"])
    skipped_set = set(skipped_files)
    labels = [it.label for it in source.items if it.rel not in skipped_set]
    m = Manifest(
        root=out_res,
        split=split,
        classes=source.classes,
        shards=shards,
        total=sum(s.count for s in shards),
        seed=seed,
        source=source_name or str(source.root.resolve() if not isinstance(src, Source) else source.root),
        skipped=len(skipped_files),
        version=FORMAT_VERSION,
        tool_version=_tool_version(),
        skipped_files=skipped_files,
        encoded=dict(sorted(encoded.items())),
        options=options,
        label_range=(min(labels), max(labels)) if labels and labeled else None,
        labeled=labeled,
        class_names=list(class_names or []),
    )
    if not shards:
        raise ShardWriteError(
            f"no readable images in {source.root}: all {len(source.items)} were skipped as bad"
        )
    # Everything durable before the manifest says the set is complete.
    _fsync_paths([p for s in shards for p in (s.path, s.index_path)] + [out_res])
    write_manifest(m)
    if progress:
        dt = time.perf_counter() - t0
        reenc = sum(v for k, v in encoded_now.items() if k != "copied")
        kept_images = sum(r["count"] for r in kept.values())
        print(
            f"{out}: {m.total} images in {len(shards)} shards, {m.bytes / 1e6:.1f} MB, "
            f"{m.skipped} skipped, {reenc} re-encoded ({dict(sorted(encoded_now.items()))}), "
            f"{len(kept)} shards ({kept_images} images) kept from an earlier run, {dt:.1f} s "
            f"({written / max(dt, 1e-9):.0f} images/s)",
            file=sys.stderr,
        )
    return m


def verify_shards(
    path: str | Path, decode: bool = True, device: str = "cpu", fix: bool = False
) -> list[Problem]:
    """Check a shard set against its manifest; returns the problems found (empty = all good).

    See :func:`unmix.pipeline.shard_verify.verify_shards`.
    """
    from unmix.pipeline.shard_verify import verify_shards as _verify

    return _verify(path, decode=decode, device=device, fix=fix)
