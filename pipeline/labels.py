"""Class labels as shards store them (``<key>.cls``: the class index in ASCII decimal), parsed strictly.

A shard set is data someone else may have written or changed: a ``.cls`` of ``-3``, ``7x2`` or ``999``
must not become a label (a lenient parser reads ``-3`` as 3 and ``7x2`` as 72, and a label past the last
class indexes out of the classifier). A label is one or more decimal digits, optionally followed by
whitespace (other WebDataset writers end it with a newline), with a value below the number of classes.
Anything else is an error naming the shard and the sample key.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a batch is parsed: `shards verify` needs only parse_label
    import torch

MAX_DIGITS = 18  # fits int64

_LABEL = re.compile(rb"[0-9]{1,18}[ \t\r\n]*")


class LabelError(ValueError):
    """A ``.cls`` entry that is not a class index of the set; names the shard and the sample key."""


def parse_label(data: bytes, num_classes: int | None) -> int:
    """One ``.cls`` member's bytes -> its class index; ``ValueError`` saying why when it is not one."""
    if not _LABEL.fullmatch(data):
        raise ValueError(f".cls is {data[:32].decode('latin1')!r}, not a class index")
    label = int(data)
    if num_classes is not None and label >= num_classes:
        raise ValueError(f"label {label} out of range (0..{num_classes - 1})")
    return label


def _where(source_info: torch.Tensor | None, row: int) -> str:
    """``shard.tar, sample KEY`` from DALI's ``source_info`` of the sample (``/x/s.tar:OFFSET:KEY.jpg``)."""
    if source_info is None:
        return f"sample {row} of the batch"
    text = bytes(source_info[row].tolist()).rstrip(b"\0").decode("utf-8", errors="replace")
    path, _, member = text.rpartition(":")
    tar = path.rpartition(":")[0] or path
    return f"{tar.rsplit('/', 1)[-1]}, sample {member.split('.', 1)[0]}"


def parse_labels(
    cls_bytes: torch.Tensor, num_classes: int | None = None, source_info: torch.Tensor | None = None
) -> torch.Tensor:
    """A batch of ``.cls`` entries, one row per sample padded with zeros ([B, L] uint8) -> labels [B] int64.

    Vectorised over the batch (a loop over the few columns only). Raises :class:`LabelError` on the first
    row that is not ``digits [whitespace]`` followed by padding, or whose value is ``>= num_classes``,
    naming its shard and key from ``source_info`` (the reader's ``source_info`` rows, zero-padded).
    """
    import torch

    b = cls_bytes.to(torch.int64)
    if b.ndim != 2:
        raise LabelError(f".cls batch of shape {tuple(b.shape)}, expected [batch, bytes]")
    n, width = b.shape
    digit = (b >= 48) & (b <= 57)
    tail = (b == 0) | (b == 32) | (b == 9) | (b == 10) | (b == 13)
    col = torch.arange(width, device=b.device).expand(n, width)
    # digits: a prefix of the row (all digits come before the first non-digit), 1..MAX_DIGITS long
    first_other = torch.where(~digit, col, torch.full_like(col, width)).min(dim=1).values
    ndigits = digit.sum(dim=1)
    ok = (ndigits == first_other) & (ndigits >= 1) & (ndigits <= MAX_DIGITS) & (digit | tail).all(dim=1)
    labels = torch.zeros(n, dtype=torch.int64, device=b.device)
    for j in range(min(width, MAX_DIGITS)):
        labels = torch.where(digit[:, j] & ok, labels * 10 + (b[:, j] - 48), labels)
    if num_classes is not None:
        ok &= labels < num_classes
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raw = bytes(cls_bytes[row].to(torch.uint8).tolist()).rstrip(b"\0")
        try:
            parse_label(raw, num_classes)
            why = f".cls is {raw[:32].decode('latin1')!r}, not a class index"  # e.g. a NUL inside
        except ValueError as e:
            why = str(e)
        raise LabelError(f"{_where(source_info, row)}: {why}")
    return labels
