"""DALI's WebDataset index (``.idx``), written and re-derived in pure Python.

The format is what DALI's own ``wds2idx`` tool writes (``nvidia.dali`` ships it as ``wds2idx.py``;
``fn.readers.webdataset(index_paths=...)`` reads it)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <data offset> <size> <member name> ...]
    ...

one line per sample, members of a sample in tar order, offsets in bytes to the member's *data* (the
512-byte tar header is before it). A sample is a run of consecutive regular-file members that share a
basename (the member name up to the first dot after the last ``/``).
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

INDEX_VERSION = "v1.2"


@dataclass(frozen=True)
class Member:
    """One regular file inside a tar: its name, data offset and size in bytes."""

    name: str
    offset: int
    size: int


def split_name(name: str) -> tuple[str, str]:
    """``"dir/00000001.jpg"`` -> ``("dir/00000001", "jpg")``, exactly as ``wds2idx`` splits."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def group_samples(members: Iterable[Member]) -> list[list[Member]]:
    """Consecutive members with the same basename form one sample (``wds2idx``'s rule)."""
    samples: list[list[Member]] = []
    last: str | None = None
    for m in members:
        base, _ = split_name(m.name)
        if not base or base.endswith("/"):  # hidden files such as ``.meta``
            continue
        if base != last:
            samples.append([m])
            last = base
        else:
            samples[-1].append(m)
    return samples


def format_index(members: Iterable[Member]) -> str:
    """The text of the ``.idx`` file for a tar holding ``members`` (in tar order)."""
    samples = group_samples(members)
    if not samples:
        raise ValueError("cannot index an empty WebDataset tar")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for sample in samples:
        lines.append(" ".join(f"{split_name(m.name)[1]} {m.offset} {m.size} {m.name}" for m in sample))
    return "\n".join(lines) + "\n"


def scan_tar(tar_path: str | Path) -> Iterator[Member]:
    """Regular-file members of ``tar_path`` with their data offsets (raises ``tarfile.TarError``)."""
    with tarfile.open(tar_path, mode="r:") as tar:
        for info in tar:
            if info.isreg():
                yield Member(info.name, info.offset_data, info.size)


def index_for_tar(tar_path: str | Path) -> str:
    """Re-derive the ``.idx`` text from the tar itself (what ``wds2idx`` would write)."""
    return format_index(scan_tar(tar_path))


def parse_index(text: str) -> list[list[Member]]:
    """Parse ``.idx`` text back into samples of members; raises ``ValueError`` on a malformed file."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty index file")
    head = lines[0].split()
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit():
        raise ValueError(f"bad index header {lines[0]!r} (expected '{INDEX_VERSION} <count>')")
    samples = []
    for n, line in enumerate(lines[1:], start=2):
        parts = line.split(" ")
        if len(parts) % 4:
            raise ValueError(f"line {n}: expected groups of 'ext offset size name', got {line!r}")
        sample = []
        for i in range(0, len(parts), 4):
            _, off, size, name = parts[i : i + 4]
            sample.append(Member(name, int(off), int(size)))
        samples.append(sample)
    if len(samples) != int(head[1]):
        raise ValueError(f"header says {head[1]} samples, file has {len(samples)}")
    return samples
