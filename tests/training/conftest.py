"""Fixtures shared by the training tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_process(monkeypatch):
    """``setup`` starts a one-process gloo group here: keep its rendezvous out of os.environ, and tear
    it down through DeepSpeed (which caches groups: a torch-only teardown leaves them stale)."""
    import deepspeed.comm
    from deepspeed.utils import groups

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    if not torch.distributed.is_initialized():  # an earlier test may have left DeepSpeed's cache stale
        groups._release_process_group_references(group=None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is several times faster on a busy machine
    yield
    torch.set_num_threads(threads)
    if torch.distributed.is_initialized():
        deepspeed.comm.destroy_process_group()
