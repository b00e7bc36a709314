"""The checkpoint's client state: what ``unmix train`` keeps beside DeepSpeed's engine state, one typed
and versioned record, written by :func:`unmix.training.checkpoint.save` and read by
:func:`unmix.training.checkpoint.load` (nowhere else).

The record travels in DeepSpeed's model-states file (``client_state``); its format version is also
recorded in the checkpoint's ``COMPLETE`` marker, so a checkpoint this unmix cannot read is refused
before its config is compared or DeepSpeed loads anything. Format versions:

- 1: the layout before versioning: the same fields, no ``format_version`` (and no ``written_by``).
  Migrated on load with nothing lost; the next checkpoint of the resumed run is written as version 2.
- 2: ``format_version`` and ``written_by`` (the unmix version that wrote it) added; every field typed.

A newer version, or a malformed one, is refused with one line naming the checkpoint, the version and
what to do (:class:`FormatError`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import unmix

FORMAT_VERSION = 2
_WHAT_TO_DO = "remove it to fall back to an older checkpoint, or start a new output_dir"


class FormatError(ValueError):
    """A checkpoint of a format version this unmix cannot read (newer, malformed or incomplete)."""


@dataclass(frozen=True)
class ClientState:
    """Where the run stands and what it needs beyond the engine's weights and optimizer state."""

    step: int  # optimizer steps done
    epoch: int  # epochs done
    pos: int  # optimizer steps done in the current epoch (0 at an epoch boundary)
    config: dict[str, Any]  # the resolved config (config.to_dict), compared on resume
    method: dict[str, Any]  # Method.state_dict(): the fp32 target network, MoCo's queue
    mlflow_run_id: str | None  # the run a resumed job continues
    written_by: str | None = unmix.__version__  # None: migrated from version 1

    def to_saved(self) -> dict[str, Any]:
        """The dict DeepSpeed stores (no copy of the tensors)."""
        return {"format_version": FORMAT_VERSION, **{f.name: getattr(self, f.name) for f in _FIELDS}}

    @classmethod
    def from_saved(cls, saved: Mapping[str, Any], path: Path) -> ClientState:
        """The record in DeepSpeed's ``client_state`` of checkpoint ``path`` (which also holds DeepSpeed's
        own keys: they are ignored), migrated to the current version; :class:`FormatError` otherwise."""
        version = check_version(saved.get("format_version", 1), path, saved.get("written_by"))
        values = {}
        for f in _FIELDS:
            if f.name not in saved:
                if version == 1 and f.name == "written_by":
                    values[f.name] = None  # not recorded before version 2
                    continue
                raise FormatError(
                    f"{path}: the client state (format version {version}) has no {f.name!r}; not resuming "
                    f"from it ({_WHAT_TO_DO})"
                )
            values[f.name] = saved[f.name]
        record = cls(**values)
        record.check(path)
        return record

    def check(self, path: Path) -> None:
        """FormatError naming the first field whose value is not of its type."""
        for name, ok in (
            ("step", _count(self.step)),
            ("epoch", _count(self.epoch)),
            ("pos", _count(self.pos)),
            ("config", isinstance(self.config, dict)),
            ("method", isinstance(self.method, dict)),
            ("mlflow_run_id", self.mlflow_run_id is None or isinstance(self.mlflow_run_id, str)),
            ("written_by", self.written_by is None or isinstance(self.written_by, str)),
        ):
            if not ok:
                value = getattr(self, name)
                raise FormatError(
                    f"{path}: the client state's {name} is {type(value).__name__} {value!r:.60}; "
                    f"not resuming from it ({_WHAT_TO_DO})"
                )


_FIELDS = dataclasses.fields(ClientState)


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_version(version: Any, path: Path, written_by: Any = None) -> int:
    """``version`` if this unmix reads it (1 to :data:`FORMAT_VERSION`), else :class:`FormatError`."""
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise FormatError(
            f"{path}: checkpoint format_version {version!r} is not a version unmix writes "
            f"(1 to {FORMAT_VERSION}); {_WHAT_TO_DO}"
        )
    if version > FORMAT_VERSION:
        by = f" (written by unmix {written_by})" if isinstance(written_by, str) else ""
        raise FormatError(
            f"{path}: checkpoint format version {version}{by} is newer than this unmix ({unmix.__version__}) "
            f"reads (1 to {FORMAT_VERSION}); resume with the unmix version that wrote it, or start a new "
            "output_dir"
        )
    return version


def stamp() -> dict[str, Any]:
    """What ``COMPLETE`` records of the format: read back by :func:`check_version` before loading."""
    return {"format_version": FORMAT_VERSION, "written_by": unmix.__version__}
