"""unmix data pipeline: WebDataset shards and DALI self-supervised loaders with Un-Mix mixing.

Standalone: imports nothing from ``training`` or ``eval``.

    from pipeline import build_pretrain_loader, build_eval_loader, UnmixConfig

The loaders (and DALI) are imported lazily, so ``import pipeline`` stays cheap for the CLI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_pretrain_loader", "build_eval_loader", "UnmixConfig"]


def __getattr__(name: str) -> Any:
    if name in ("build_pretrain_loader", "build_eval_loader"):
        from pipeline import loaders

        return getattr(loaders, name)
    if name == "UnmixConfig":
        from pipeline.mixing import UnmixConfig

        return UnmixConfig
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
