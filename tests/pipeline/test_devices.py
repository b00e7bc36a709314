"""The CUDA device of a local rank: indexes the visible devices (srun --gpus-per-task), faked counts."""

from __future__ import annotations

import pytest
import torch

from unmix.pipeline import devices


def _fake_gpus(monkeypatch, n: int) -> list[int]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


@pytest.mark.parametrize(
    ("visible", "local_rank", "expected"),
    [
        (8, 0, 0),
        (8, 5, 5),  # every task sees the whole node: local rank r uses cuda:r
        (1, 0, 0),
        (1, 5, 0),  # srun --gpus-per-task=1: task 5 sees its own GPU only, as cuda:0
        (2, 5, 1),  # two GPUs per task
    ],
)
def test_local_rank_indexes_the_visible_devices(monkeypatch, visible, local_rank, expected):
    _fake_gpus(monkeypatch, visible)
    assert devices.local_cuda_index(local_rank) == expected


def test_reads_local_rank_and_sets_the_device(monkeypatch):
    chosen = _fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert devices.local_cuda_device() == torch.device("cuda", 0)
    assert chosen == [0]
    monkeypatch.delenv("LOCAL_RANK")
    _fake_gpus(monkeypatch, 4)
    assert devices.local_cuda_index() == 0


def test_no_visible_device_names_cuda_visible_devices(monkeypatch):
    _fake_gpus(monkeypatch, 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES=''"):
        devices.local_cuda_index(0)


def test_bad_local_rank_is_named(monkeypatch):
    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="LOCAL_RANK='x'"):
        devices.local_cuda_index()


def test_every_user_goes_through_the_one_rule(monkeypatch):
    """The loaders, the training loop and evaluation all pick the device with local_cuda_index."""
    chosen = _fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    from unmix.pipeline.loaders import _device_id
    from unmix.training.config import load_config
    from unmix.training.loop import pick_device

    assert _device_id("gpu") == 0
    assert pick_device(load_config(None, ["data.device=gpu"]), 2) == torch.device("cuda", 0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    from unmix.eval.distributed import setup

    ctx = setup("gpu")
    assert ctx.device == torch.device("cuda", 0) and ctx.local_rank == 2
    assert chosen == [0, 0]
