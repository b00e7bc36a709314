"""Loading torch files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a file can run any command when it
is loaded. Everything this package reads back (checkpoints, ``backbone.pt``) goes through
:func:`check_file` / :func:`load`: ``torch.load(weights_only=True)`` plus an explicit allow-list of the
few classes DeepSpeed 0.19's checkpoint files hold (ZeRO 0/1/2, fp32/bf16/fp16; nothing else).
A file holding any other global is refused before anything in it is built, naming the file and the
global. :func:`deepspeed_loads` extends the same restriction to DeepSpeed's own ``torch.load`` calls
(which pass ``weights_only=False``) while it loads a checkpoint we have checked.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# The classes DeepSpeed 0.19.8 pickles into its checkpoint files beyond tensors and builtins (measured on
# CPU for ZeRO 0/1/2, and read from its source for fp16: stage_1_and_2.state_dict stores the loss scaler
# object itself). The model-states file of ZeRO 0 holds none.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO 1/2 (a static scaler for fp32/bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # ZeRO 1/2 with fp16
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO 1/2 optimizer states: the stage
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO 1/2: parameter slice mappings
)


class UnsafeFileError(ValueError):
    """A torch file refused: it holds code (a global outside the allow-list) or is not a torch file."""


def _resolve(name: str) -> Any:
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _allowed(names: tuple[str, ...]) -> list[Any]:
    return [_resolve(n) for n in names]


def _offending_global(path: Path, exc: BaseException | None) -> str | None:
    """The first global outside the allow-list: from a static scan of the pickle (no code runs), else
    from the unpickler's message."""
    with contextlib.suppress(Exception):
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        if unsafe:
            return unsafe[0]
    match = re.search(r"GLOBAL (\S+)", str(exc or ""))
    return match.group(1) if match else None


def load(path: str | Path, allowed: tuple[str, ...] = (), *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU with the globals ``allowed`` (dotted names).

    Raises :class:`UnsafeFileError` ("refused: it holds code (global X)") for a pickle that needs any other
    global, ``FileNotFoundError`` for a missing file, and lets other load errors (truncation, a file that
    is no pickle) through.
    """
    path = Path(path)
    mmap = mmap and zipfile.is_zipfile(path)  # torch's legacy (non-zip) format cannot be memory-mapped
    with torch.serialization.safe_globals(_allowed(allowed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as exc:
            unsafe = _offending_global(path, exc)
            if unsafe is None:  # not a global: damage or a foreign format, for the caller to describe
                raise
            raise UnsafeFileError(f"{path}: refused: it holds code (global {unsafe})") from exc


def check_file(path: str | Path, allowed: tuple[str, ...] = DEEPSPEED_GLOBALS) -> None:
    """Refuse ``path`` unless it loads weights-only with ``allowed`` (memory-mapped: reads no tensor data)."""
    path = Path(path)
    try:
        load(path, allowed, mmap=True)
    except UnsafeFileError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise UnsafeFileError(
            f"{path}: refused: not a loadable torch file ({type(exc).__name__}: {text[0] if text else ''})"
        ) from exc


@contextlib.contextmanager
def deepspeed_loads(allowed: tuple[str, ...] = DEEPSPEED_GLOBALS) -> Iterator[None]:
    """Within the block every ``torch.load`` is weights-only with ``allowed`` (DeepSpeed's included, which
    ask for ``weights_only=False``): ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` overrides the call's argument."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_allowed(allowed)):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old
