"""Writes that never leave a half-written file: write a temporary file beside the target, then rename.

A reader sees the old file or the new one, never a mixture; a failed write (full disk, read-only
directory) leaves the old file as it was and raises :class:`WriteError`, whose one-line message names
the path and says why in words ("disk full", "read-only file system", "permission denied").
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

# Below this much free space a failed write is reported as a full disk (torch's own writer reports
# ENOSPC as "unexpected pos ..." without the errno).
FULL_BELOW_BYTES = 64 << 20

_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOENT: "no such directory",
    errno.ENOTDIR: "a parent is not a directory",
    errno.EISDIR: "it is a directory",
}


class WriteError(OSError):
    """A file could not be written; the message names the path and the reason."""


def free_bytes(path: str | Path) -> int | None:
    """Free space (for this user) on the file system holding ``path`` or its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def reason(exc: BaseException, path: str | Path) -> str:
    """Why writing ``path`` failed with ``exc``, in words: the errno's meaning, or "disk full" when the
    file system holding ``path`` has (almost) no space left whatever the exception says."""
    if isinstance(exc, OSError) and exc.errno in _REASONS:
        return _REASONS[exc.errno]
    free = free_bytes(path)
    if free is not None and free < FULL_BELOW_BYTES:
        return f"disk full ({free >> 20} MiB free)"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it is renamed onto ``path``.

    On any failure the temporary file is removed, ``path`` is left as it was and :class:`WriteError` is
    raised (the original exception chained).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError
        why = reason(exc, path)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise WriteError(f"{path}: cannot write: {why}") from exc


def write_text(path: str | Path, text: str, *, sync: bool = True) -> Path:
    """Write ``text`` to ``path`` atomically (fsync'ed first unless ``sync`` is False)."""
    path = Path(path)
    with replacing(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    return path


def check_writable(directory: str | Path, what: str) -> None:
    """Create ``directory`` if needed and prove a file can be written in it; ``what`` names it in the error
    (e.g. ``"output_dir"``). Raises :class:`WriteError` before any work starts."""
    directory = Path(directory)
    probe = directory / f".unmix-write-probe{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise WriteError(f"{what} {directory}: cannot write there: {reason(exc, directory)}") from exc
