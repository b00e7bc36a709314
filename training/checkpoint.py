"""Checkpoints: DeepSpeed's engine state plus our client state, switched in only when complete.

Layout under ``<output_dir>/checkpoints/``::

    step_00000120/            one checkpoint (DeepSpeed files + rank<r>_state.pt + COMPLETE)
    latest                    the tag of the newest complete checkpoint (informational)
    nonfinite_step_00000131.json   diagnostics of a non-finite loss (never written into a checkpoint)

Saving: every rank calls :func:`save`; DeepSpeed writes its files, each rank writes its RNG states and
loader position, a barrier waits for all, then rank 0 records every file's size and SHA-256 in
``COMPLETE`` (written to a temporary name and renamed), switches ``latest`` the same way and deletes
all but the newest ``keep`` *verified* checkpoints (a damaged one never counts, so the one a run resumed
from survives until ``keep`` newer intact ones exist). A checkpoint interrupted at any point has no
``COMPLETE`` and is ignored; a write that fails (full disk) removes its partial directory and raises
:class:`~unmix.training.atomic.WriteError` naming the path, leaving the last good checkpoint in place.
Loading (:func:`find_resumable`) takes the newest checkpoint whose files all match their recorded size
and hash, and warns naming every newer one it skipped and why; it then refuses (:class:`ResumeError`)
a checkpoint of a format version this unmix cannot read (``COMPLETE`` records it) or any of whose files
needs more than a weights-only load (see :mod:`unmix.training.safe_load`), and :func:`load` keeps
DeepSpeed's own loads weights-only. The client state is a typed, versioned record
(:class:`~unmix.training.checkpoint_state.ClientState`, where the format versions are listed); our
per-rank state holds only tensors and builtins (the RNG states as tensors and lists).

Signals cannot corrupt a checkpoint: the handlers only set a flag (see :mod:`unmix.training.preemption`),
and a process killed outright leaves at worst a directory without ``COMPLETE``.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix.training import atomic, checkpoint_state, dist, safe_load
from unmix.training.checkpoint_state import ClientState

COMPLETE = "COMPLETE"


class ResumeError(RuntimeError):
    """The output directory holds a checkpoint this job cannot continue (e.g. another process count)."""


PREFIX = "step_"


def tag_for(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors, lists and numbers only (they load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
        "python": [version, list(internal), gauss_next],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(engine, ckpt_dir: Path, client: ClientState, rank_state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``client.step`` on every rank; returns its directory. Collective: call on all ranks.

    ``client`` (identical on all ranks) goes into DeepSpeed's model-states file, its config also into
    ``config.json``; ``rank_state`` (this rank's data-loader position) and the RNG states into
    ``rank<r>_state.pt``.
    """
    ckpt_dir = Path(ckpt_dir)
    step = client.step
    tag = tag_for(step)
    path = ckpt_dir / tag
    # The same step may already be on disk: intact (e.g. the end-of-run checkpoint right after an epoch's)
    # -> keep it; damaged (a resume fell back past it) -> replace it.
    state: list[Any] = [False]
    if dist.rank() == 0 and path.exists():
        state[0] = verify(path) is None
        if not state[0]:
            shutil.rmtree(path)
    if dist.world_size() > 1:
        torch.distributed.broadcast_object_list(state, src=0)
    if state[0]:
        return path
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client.to_saved(), save_latest=False)
        torch.save({"rng": rng_state(), **rank_state}, path / f"rank{dist.rank()}_state.pt")
        if dist.rank() == 0:  # readable without loading the checkpoint
            atomic.write_text(path / "config.json", json.dumps(client.config, indent=1))
    except (OSError, RuntimeError) as exc:  # torch's writer reports a full disk as a RuntimeError
        _write_failed(ckpt_dir, path, exc)
    dist.barrier()  # every rank's files are on disk
    if dist.rank() == 0:
        try:
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
            record = {
                "step": step,
                "world_size": dist.world_size(),
                **checkpoint_state.stamp(),
                "files": {str(p.relative_to(path)): [p.stat().st_size, _sha256(p)] for p in files},
            }
            atomic.write_text(path / COMPLETE, json.dumps(record, indent=1))
            _remember_intact(path)
            atomic.write_text(ckpt_dir / "latest", tag)
        except OSError as exc:
            _write_failed(ckpt_dir, path, exc)
        prune(ckpt_dir, keep)
    dist.barrier()
    return path


def _write_failed(ckpt_dir: Path, path: Path, exc: BaseException) -> None:
    """Remove the partial checkpoint ``path`` (it frees the space) and raise a one-line WriteError."""
    why = atomic.reason(exc.__cause__ or exc, path)  # measured before the partial files are removed
    shutil.rmtree(path, ignore_errors=True)
    good = next((p.name for p in _tags(ckpt_dir) if _is_intact(p)), None)
    kept = f"the last good checkpoint {good} is kept" if good else "no earlier checkpoint exists"
    raise atomic.WriteError(f"{path}: cannot write the checkpoint: {why}; {kept}") from exc


def _tags(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    dirs = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


# Checkpoints this process has seen verify intact: directory -> its COMPLETE marker's mtime (ns). Pruning
# counts only intact checkpoints; this spares it re-hashing the ones it has already checked.
_intact: dict[str, int] = {}


def _remember_intact(path: Path) -> None:
    _intact[str(path)] = (path / COMPLETE).stat().st_mtime_ns


def _is_intact(path: Path) -> bool:
    try:
        stamp = (path / COMPLETE).stat().st_mtime_ns
    except OSError:
        return False
    if _intact.get(str(path)) == stamp:
        return True
    if verify(path) is None:
        _intact[str(path)] = stamp
        return True
    return False


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all checkpoints older than the newest ``keep`` *verified* ones (complete, every file's size
    and hash as recorded). Damaged or incomplete checkpoints never count towards ``keep``, so a run that
    resumed from an older good checkpoint keeps it until ``keep`` newer intact ones exist."""
    intact: list[Path] = []
    for p in _tags(ckpt_dir):
        if len(intact) < keep and _is_intact(p):
            intact.append(p)
    if len(intact) < keep:
        return
    oldest_kept = intact[-1].name
    for p in _tags(ckpt_dir):
        if p.name < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


def _record(path: Path) -> dict[str, Any]:
    """The parsed COMPLETE record; ValueError naming what is malformed."""
    record = json.loads((path / COMPLETE).read_text())
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(v, list)
        and len(v) == 2
        and isinstance(v[0], int)
        and isinstance(v[1], str)
        and isinstance(k, str)
        and ".." not in Path(k).parts
        and not Path(k).is_absolute()
        for k, v in files.items()
    ):
        raise ValueError('expected {"files": {relative name: [size, sha256], ...}, ...}')
    if not isinstance(record.get("world_size", 1), int):
        raise ValueError("world_size is not an integer")
    return record


def verify(path: Path) -> str | None:
    """None if checkpoint ``path`` is complete and intact, else the reason it is not."""
    marker = path / COMPLETE
    if not marker.exists():
        return "incomplete (no COMPLETE marker: interrupted while saving)"
    try:
        record = _record(path)
    except (OSError, ValueError) as exc:  # JSONDecodeError is a ValueError
        return f"malformed {COMPLETE} marker ({exc})"
    for name, (size, digest) in record["files"].items():
        f = path / name
        if not f.exists():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"truncated file {name} ({f.stat().st_size} of {size} bytes)"
        if _sha256(f) != digest:
            return f"corrupted file {name} (SHA-256 differs)"
    return None


def find_resumable(ckpt_dir: Path, world_size: int) -> Path | None:
    """The newest intact checkpoint (rank 0 decides, all ranks agree), warning about skipped ones.

    Raises :class:`ResumeError` when it was written by a different number of processes: each rank's data
    position belongs to its shard of the data, so the run cannot continue exactly with another count.
    """
    choice: list[Any] = [None, None]
    if dist.rank() == 0:
        skipped = []
        for path in _tags(Path(ckpt_dir)):
            reason = verify(path)
            if reason is None:
                _remember_intact(path)
                choice[0] = str(path)
                record = _record(path)
                written_by = record.get("world_size")
                if (refusal := _format_refusal(path, record)) is not None:
                    choice[1] = refusal
                elif written_by != world_size:
                    choice[1] = (
                        f"{path}: written by {written_by} process(es), this job has {world_size}; resume "
                        f"with {written_by} process(es), or start a new output_dir"
                    )
                else:
                    choice[1] = check_files(path)
                break
            skipped.append(f"{path.name}: {reason}")
        if skipped:
            warnings.warn(
                f"{ckpt_dir}: skipped checkpoint(s) {'; '.join(skipped)}; "
                + (f"resuming from {Path(choice[0]).name}" if choice[0] else "starting from scratch"),
                stacklevel=2,
            )
    if dist.world_size() > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    if choice[1]:
        raise ResumeError(choice[1])
    return Path(choice[0]) if choice[0] else None


def check_files(path: Path) -> str | None:
    """None if every torch file of checkpoint ``path`` loads weights-only with DeepSpeed's allow-list,
    else a refusal naming the file and the offending global. Nothing in the files runs."""
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in (COMPLETE, "config.json")):
        try:
            safe_load.check_file(f)
        except safe_load.UnsafeFileError as exc:
            return f"{exc}; not resuming from {path.name} (remove it to start over)"
    return None


def _format_refusal(path: Path, record: dict[str, Any]) -> str | None:
    """None if this unmix reads the format version ``COMPLETE`` records (none: version 1), else why not."""
    try:
        checkpoint_state.check_version(record.get("format_version", 1), path, record.get("written_by"))
    except checkpoint_state.FormatError as exc:
        return str(exc)
    return None


def newest_config(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The resolved config stored with the newest checkpoint that has a COMPLETE marker (no hashing).

    Raises :class:`ResumeError` when that checkpoint's format version is one this unmix cannot read (its
    config would be compared against the wrong keys).
    """
    for path in _tags(Path(ckpt_dir)):
        if (path / COMPLETE).exists() and (path / "config.json").exists():
            try:
                record, config = _record(path), json.loads((path / "config.json").read_text())
            except (OSError, ValueError):  # JSONDecodeError is a ValueError
                continue
            if (refusal := _format_refusal(path, record)) is not None:
                raise ResumeError(refusal)
            return path, config
    return None


def load(engine, path: Path) -> tuple[ClientState, dict[str, Any]]:
    """Load engine + optimizer state from ``path``; returns (client state, this rank's state).

    Also restores this rank's RNG states. Every load is weights-only (DeepSpeed's too): call it on a
    checkpoint :func:`find_resumable` chose, which has checked the files and the format version. A
    client state of format version 1 is migrated; one that cannot be read raises :class:`ResumeError`.
    """
    with safe_load.deepspeed_loads():
        loaded, client_state = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    try:
        client = ClientState.from_saved(client_state, path)
    except checkpoint_state.FormatError as exc:
        raise ResumeError(str(exc)) from None
    rank_state = safe_load.load(path / f"rank{dist.rank()}_state.pt")
    set_rng_state(rank_state.pop("rng"))
    return client, rank_state


def write_diagnostics(ckpt_dir: Path, step: int, info: dict[str, Any]) -> Path:
    """Diagnostics of a failed step beside the checkpoints (never inside or over one)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"nonfinite_{tag_for(step)}.json"
    atomic.write_text(path, json.dumps(info, indent=1, default=str))
    return path
