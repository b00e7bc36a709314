"""unmix data pipeline: WebDataset shards and DALI self-supervised loaders with Un-Mix mixing.

Standalone: imports nothing from ``training`` or ``eval``.
"""
