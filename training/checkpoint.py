"""Checkpoints: DeepSpeed's engine state plus our client state, switched in only when complete.

Layout under ``<output_dir>/checkpoints/``::

    step_00000120/            one checkpoint (DeepSpeed files + rank<r>_state.pt + COMPLETE)
    latest                    the tag of the newest complete checkpoint (informational)
    nonfinite_step_00000131.json   diagnostics of a non-finite loss (never written into a checkpoint)

Saving: every rank calls :func:`save`; DeepSpeed writes its files, each rank writes its RNG states and
loader position, a barrier waits for all, then rank 0 records every file's size and SHA-256 in
``COMPLETE`` (written to a temporary name and renamed), switches ``latest`` the same way and deletes
all but the newest ``keep`` complete checkpoints. A checkpoint interrupted at any point has no
``COMPLETE`` and is ignored. Loading (:func:`find_resumable`) takes the newest checkpoint whose files
all match their recorded size and hash, and warns naming every newer one it skipped and why.

Signals cannot corrupt a checkpoint: the handlers only set a flag (see :mod:`training.preemption`),
and a process killed outright leaves at worst a directory without ``COMPLETE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unmix.training import dist

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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    engine, ckpt_dir: Path, step: int, client_state: dict[str, Any], rank_state: dict[str, Any], keep: int
) -> Path:
    """Write checkpoint ``step`` on every rank; returns its directory. Collective: call on all ranks.

    ``client_state`` (identical on all ranks) goes into DeepSpeed's model-states file; ``rank_state``
    (this rank's data-loader position) and the RNG states into ``rank<r>_state.pt``.
    """
    ckpt_dir = Path(ckpt_dir)
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
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save({"rng": rng_state(), **rank_state}, path / f"rank{dist.rank()}_state.pt")
    if dist.rank() == 0 and "config" in client_state:  # readable without loading the checkpoint
        (path / "config.json").write_text(json.dumps(client_state["config"], indent=1))
    dist.barrier()  # every rank's files are on disk
    if dist.rank() == 0:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != COMPLETE)
        record = {
            "step": step,
            "world_size": dist.world_size(),
            "files": {str(p.relative_to(path)): [p.stat().st_size, _sha256(p)] for p in files},
        }
        _atomic_write(path / COMPLETE, json.dumps(record, indent=1))
        _atomic_write(ckpt_dir / "latest", tag)
        prune(ckpt_dir, keep)
    dist.barrier()
    return path


def _tags(ckpt_dir: Path) -> list[Path]:
    """Checkpoint directories, newest step first."""
    if not ckpt_dir.is_dir():
        return []
    dirs = [p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith(PREFIX)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and incomplete ones older than those."""
    complete = [p for p in _tags(ckpt_dir) if (p / COMPLETE).exists()]
    if len(complete) < keep:
        return
    oldest_kept = complete[keep - 1].name
    for p in _tags(ckpt_dir):
        if p.name < oldest_kept:
            shutil.rmtree(p, ignore_errors=True)


def verify(path: Path) -> str | None:
    """None if checkpoint ``path`` is complete and intact, else the reason it is not."""
    marker = path / COMPLETE
    if not marker.exists():
        return "incomplete (no COMPLETE marker: interrupted while saving)"
    try:
        record = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"unreadable {COMPLETE} marker ({exc})"
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
                choice[0] = str(path)
                written_by = json.loads((path / COMPLETE).read_text()).get("world_size")
                if written_by != world_size:
                    choice[1] = (
                        f"{path}: written by {written_by} process(es), this job has {world_size}; resume "
                        f"with {written_by} process(es), or start a new output_dir"
                    )
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


def newest_config(ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The resolved config stored with the newest checkpoint that has a COMPLETE marker (no hashing)."""
    for path in _tags(Path(ckpt_dir)):
        if (path / COMPLETE).exists() and (path / "config.json").exists():
            try:
                return path, json.loads((path / "config.json").read_text())
            except (OSError, json.JSONDecodeError):
                continue
    return None


def load(engine, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load engine + optimizer state from ``path``; returns (client state, this rank's state).

    Also restores this rank's RNG states.
    """
    loaded, client_state = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if loaded is None:
        raise RuntimeError(f"{path}: DeepSpeed could not load this checkpoint")
    rank_state = torch.load(path / f"rank{dist.rank()}_state.pt", weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return client_state, rank_state


def write_diagnostics(ckpt_dir: Path, step: int, info: dict[str, Any]) -> Path:
    """Diagnostics of a failed step beside the checkpoints (never inside or over one)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"nonfinite_{tag_for(step)}.json"
    _atomic_write(path, json.dumps(info, indent=1, default=str))
    return path
