"""WebDataset shard sets for DALI: write them, read their manifest, verify them.

    from unmix.pipeline.shards import write_shards, verify_shards, read_manifest, check_shard_set

One module per concept:

- :mod:`~unmix.pipeline.shards.manifest`: the set's ``manifest.json`` (:class:`Manifest`,
  :func:`read_manifest`, :func:`check_shard_set`) and the errors; the only module the readers of a set
  (the loaders, training, evaluation) import.
- :mod:`~unmix.pipeline.shards.writer`: :func:`write_shards`, with :mod:`~unmix.pipeline.shards.plan`
  (shuffle, cut, job identity, resume), :mod:`~unmix.pipeline.shards.tar` (one tar and its index),
  :mod:`~unmix.pipeline.shards.sources` (image tree or list file),
  :mod:`~unmix.pipeline.shards.class_subset` (``--classes``), :mod:`~unmix.pipeline.shards.jpeg`
  (format sniffing, JPEG checks, re-encoding), :mod:`~unmix.pipeline.shards.dali_index` (DALI's ``.idx``).
- :mod:`~unmix.pipeline.shards.verify`: :func:`verify_shards` (checksums, indices, labels, decoding).
- Readers of the published archives: :mod:`~unmix.pipeline.shards.cifar`,
  :mod:`~unmix.pipeline.shards.stl10`, :mod:`~unmix.pipeline.shards.tiny_imagenet`, written by
  :mod:`~unmix.pipeline.shards.archives`; built-in samples: :mod:`~unmix.pipeline.shards.sample`;
  ``unmix bench shards``: :mod:`~unmix.pipeline.shards.bench`.

The names below are imported on first use: reading a manifest does not load the writer (PIL, numpy, the
worker pool) or the verifier.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "Manifest": "manifest",
    "ShardInfo": "manifest",
    "Problem": "manifest",
    "ManifestError": "manifest",
    "ShardSetError": "manifest",
    "ShardWriteError": "manifest",
    "read_manifest": "manifest",
    "check_shard_set": "manifest",
    "shard_set_problems": "manifest",
    "legacy_notice": "manifest",
    "SourceError": "sources",
    "write_shards": "writer",
    "verify_shards": "verify",
}

__all__ = list(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'unmix.pipeline.shards' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"unmix.pipeline.shards.{_HOME[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
