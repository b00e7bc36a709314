"""unmix data pipeline: WebDataset shards and DALI self-supervised loaders with Un-Mix mixing.

Standalone: imports nothing from ``unmix.training`` or ``unmix.eval``.

    from unmix.pipeline import build_pretrain_loader, build_eval_loader, UnmixConfig
    from unmix.pipeline import pretrain_pipeline, eval_pipeline, device_report  # the graphs, checked
    from unmix.pipeline.shards import write_shards, verify_shards, read_manifest  # shard sets

The loaders (and DALI) are imported lazily, so ``import unmix.pipeline`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "build_pretrain_loader",
    "build_eval_loader",
    "pretrain_pipeline",
    "eval_pipeline",
    "device_report",
    "UnmixConfig",
]


def __getattr__(name: str) -> Any:
    if name in ("build_pretrain_loader", "build_eval_loader", "pretrain_pipeline", "eval_pipeline"):
        from unmix.pipeline import loaders

        return getattr(loaders, name)
    if name == "device_report":
        from unmix.pipeline.graph_check import device_report

        return device_report
    if name == "UnmixConfig":
        from unmix.pipeline.mix_config import UnmixConfig

        return UnmixConfig
    raise AttributeError(f"module 'unmix.pipeline' has no attribute {name!r}")
