"""Shared fixtures. Everything here runs on the CPU: DALI with device_id=None, DeepSpeed on gloo."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# DeepSpeed picks its accelerator at import time; tests never have a GPU in CI.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in `digits` sample written once per test session: ``<root>/train`` and ``<root>/val``."""
    from unmix.pipeline.shards.sample import write_sample

    root = tmp_path_factory.mktemp("digits")
    write_sample("digits", root)
    return root


@pytest.fixture(scope="session")
def sample_train(sample_root: Path) -> Path:
    return sample_root / "train"


@pytest.fixture(scope="session")
def sample_val(sample_root: Path) -> Path:
    return sample_root / "val"


@pytest.fixture(autouse=True)
def _no_stale_deepspeed_groups() -> Iterator[None]:
    """DeepSpeed caches its process groups per process; a test that tears the torch group down (or
    leaves it to a later test) would hand the next in-process engine a destroyed group ("Group ... is
    not registered"). Drop the cache whenever no torch group is alive after a test."""
    yield
    if "deepspeed.utils.groups" not in sys.modules:
        return
    import torch.distributed

    if not torch.distributed.is_initialized():
        sys.modules["deepspeed.utils.groups"]._release_process_group_references(group=None)
