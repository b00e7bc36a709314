"""Planning a shard job: the shuffle and the cut into shards, the job's identity, and claiming OUT.

``OUT/.unmix-job.json`` describes the job (the sorted file list with labels and sizes, seed, sizing,
encoding options), so re-running the same job after an interruption keeps the recorded shards whose
checksums still match (``OUT/.unmix-done.jsonl``) and rewrites the rest; the shard assignment depends
only on that description, so the result is byte-identical to an uninterrupted run. ``overwrite`` replaces
another job's set by deleting only the files that job wrote (its manifest's and progress log's lists).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from unmix.pipeline.shards.jpeg import PrepSettings
from unmix.pipeline.shards.manifest import (
    DONE_FILE,
    FORMAT_VERSION,
    JOB_FILE,
    MANIFEST,
    ShardWriteError,
    atomic_write_text,
    is_plain_name,
    sha256_file,
)
from unmix.pipeline.shards.sources import Source, SourceItem


def plan_shards(
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


def job_description(
    source: Source, split: str, seed: int, spp: int | None, shard_bytes: int | None, settings: PrepSettings
) -> dict[str, Any]:
    """The job's identity (``OUT/.unmix-job.json``): a digest of the sorted file list (paths, labels,
    sizes) and classes, the split, seed, sizing and encoding options. Same description = same shards."""
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
    names = {n for n in names if is_plain_name(n)}  # never a path
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


def prepare_out(out: Path, job: dict[str, Any], overwrite: bool, names: list[str]) -> bool:
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
            atomic_write_text(job_path, json.dumps(job, indent=1, sort_keys=True) + "\n")
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
    atomic_write_text(job_path, json.dumps(job, indent=1, sort_keys=True) + "\n")
    return False


def load_done(out: Path, names: set[str]) -> dict[str, dict[str, Any]]:
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


def default_split(out: Path) -> str:
    """The default split name (shard name prefix): OUT's directory name as letters, digits and ``_``."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", out.resolve().name).strip("_")
    return name or "data"
