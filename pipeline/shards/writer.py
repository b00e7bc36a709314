"""``write_shards``: an image tree, a list file or an in-memory source -> a shuffled WebDataset shard set.

Samples are shuffled globally at write time (DALI only shuffles inside a buffer); a sample's key is the
zero-padded index of its source file in the sorted source list, so every sample can be traced back to its
file. Images are prepared (validated, re-encoded where needed: :mod:`unmix.pipeline.shards.jpeg`) by a
pool of worker processes, and written by :class:`~unmix.pipeline.shards.tar.ShardTar`.

Crash safety: each tar and index is written as ``*.partial`` and renamed when complete; a finished shard
is recorded in ``OUT/.unmix-done.jsonl`` with its sha256; ``manifest.json`` appears (atomically) only
when every shard is done. Re-running the same job after an interruption resumes it
(:mod:`unmix.pipeline.shards.plan`); the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unmix.pipeline.shards.class_subset import keep_classes as subset_classes
from unmix.pipeline.shards.class_subset import read_class_file
from unmix.pipeline.shards.jpeg import Prepared, PrepSettings, prepare_chunk
from unmix.pipeline.shards.manifest import (
    DONE_FILE,
    FORMAT_VERSION,
    MANIFEST,
    Manifest,
    ManifestError,
    ShardInfo,
    ShardWriteError,
    manifest_path,
    read_manifest,
    write_manifest,
)
from unmix.pipeline.shards.plan import default_split, job_description, load_done, plan_shards, prepare_out
from unmix.pipeline.shards.sources import Source, SourceItem, read_list, scan_tree
from unmix.pipeline.shards.tar import ShardTar, Sink

DEFAULT_SAMPLES_PER_SHARD = 1000
KEY_DIGITS = 8
#: Test hook: the writer SIGKILLs itself after writing this many samples (simulates a crash mid-shard).
KILL_AFTER_ENV = "UNMIX_SHARDS_TEST_KILL_AFTER"


def _tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("unmix")
    except Exception:
        return "0+unknown"


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


def available_cpus() -> int:
    """CPUs this process may run on (respects Slurm/cgroup affinity, unlike ``os.cpu_count``)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


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
            or a ready :class:`~unmix.pipeline.shards.sources.Source` (e.g. ``memory_source``, used by the
            samples and the archive readers).
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
        keep_classes: a class list file (``--classes``, :mod:`unmix.pipeline.shards.class_subset`): only
            these classes are written, indexed in sorted order (or by ``classes_from``).
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
    split = split or default_split(out)
    if not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise ValueError(f"split {split!r} must be letters, digits and '_' (it prefixes shard names)")
    settings = PrepSettings(quality=quality, max_side=max_side)
    workers = available_cpus() if workers is None else workers

    job = job_description(source, split, seed, samples_per_shard, shard_bytes, settings)
    if skip_bad:  # part of the job's identity (absent when false: sets written before stay the same job)
        job["skip_bad"] = True
    if not labeled:  # likewise: a labelled set and an unlabeled one of the same images are different jobs
        job["labeled"] = False
    plan = plan_shards(source.items, seed, samples_per_shard, shard_bytes)
    names = [f"{split}-{i:06d}.tar" for i in range(len(plan))]
    resuming = prepare_out(out, job, overwrite, names)
    options = {
        "samples_per_shard": samples_per_shard,
        "shard_bytes": shard_bytes,
        "quality": quality,
        "max_side": max_side,
        "list_file": str(Path(list_file).resolve()) if list_file else None,
        "classes_from": str(manifest_path(classes_from).resolve()) if classes_from else None,
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
    kept = load_done(out, set(names)) if resuming else {}
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
    sink = Sink()
    try:
        with open(out / DONE_FILE, "a") as done_log:
            for i in todo:
                shard = ShardTar(out / names[i], sink)
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
