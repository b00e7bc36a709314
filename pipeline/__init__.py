"""unmix data pipeline: WebDataset shards and DALI self-supervised loaders with Un-Mix mixing.

Standalone: imports nothing from ``unmix.training`` or ``unmix.eval``.

    from unmix.pipeline import build_pretrain_loader, build_eval_loader, UnmixConfig

The loaders (and DALI) are imported lazily, so ``import unmix.pipeline`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_pretrain_loader", "build_eval_loader", "UnmixConfig"]


def __getattr__(name: str) -> Any:
    if name in ("build_pretrain_loader", "build_eval_loader"):
        from unmix.pipeline import loaders

        return getattr(loaders, name)
    if name == "UnmixConfig":
        from unmix.pipeline.mixing import UnmixConfig

        return UnmixConfig
    raise AttributeError(f"module 'unmix.pipeline' has no attribute {name!r}")
