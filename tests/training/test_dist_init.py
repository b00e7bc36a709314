"""training/dist.py on CUDA, with the device count mocked: the device follows LOCAL_RANK % visible, the
NCCL group is created with that ``device_id`` before DeepSpeed (which reuses it), and two ranks on one
physical GPU stop the run naming both."""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from unmix.training import dist

WORLD = 8


class _Props:
    def __init__(self, uuid: str):
        self.uuid = uuid


def _store(others: dict[int, str]) -> tdist.Store:
    """A rendezvous store in which the other ranks have already published their GPUs."""
    store = tdist.HashStore()
    for r, ident in others.items():
        store.set(f"unmix/gpu/{r}", ident)
    return store


@pytest.fixture
def cuda(monkeypatch):
    """``visible`` CUDA devices (each with its own UUID); records set_device and init_process_group."""
    calls: dict = {"set_device": [], "init": []}

    def install(visible: int, rank: int, local_rank: int, store: tdist.Store):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
        monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls["set_device"].append(i))
        # rank r's task sees its own GPUs: uuid "node0-<visible slot of its first GPU>-<i>"
        monkeypatch.setattr(
            torch.cuda, "get_device_properties", lambda i: _Props(f"{rank if visible == 1 else 0}-{i}")
        )
        monkeypatch.setattr(tdist, "rendezvous", lambda *a, **k: iter([(store, rank, WORLD)]))
        monkeypatch.setattr(tdist, "init_process_group", lambda *a, **k: calls["init"].append((a, k)))
        monkeypatch.setattr(dist.socket, "gethostname", lambda: "node0")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(WORLD))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        return calls

    return install


@pytest.mark.parametrize("visible", [1, 8])
@pytest.mark.parametrize("local_rank", range(8))
def test_device_follows_local_rank_modulo_visible(cuda, visible, local_rank):
    """srun --gpus-per-task=1 (1 visible: every rank on its cuda:0) and one task seeing all 8 GPUs."""
    index = local_rank % visible
    others = {r: f"node0:GPU-{r if visible == 1 else 0}-{r}" for r in range(WORLD) if r != local_rank}
    calls = cuda(visible, local_rank, local_rank, _store(others))
    device = dist.init_cuda_group()
    assert device == torch.device("cuda", index)
    assert calls["set_device"] == [index]
    ((args, kwargs),) = calls["init"]
    assert args == ("nccl",) and kwargs["device_id"] == torch.device("cuda", index)
    assert kwargs["rank"] == local_rank and kwargs["world_size"] == WORLD and "store" in kwargs


def test_two_ranks_on_one_gpu_fail_naming_both(cuda):
    # 8 ranks on a node whose tasks each see the same single GPU (a wrong --gpu-bind): rank 5 collides
    others = {r: f"node0:GPU-x-{r}" for r in range(WORLD)}
    others[2] = "node0:GPU-0-0"
    del others[5]
    calls = cuda(1, 5, 5, _store(others))
    torch.cuda.get_device_properties = lambda i: _Props("0-0")  # restored by monkeypatch
    with pytest.raises(RuntimeError, match=r"ranks 2 and 5 both compute on GPU node0:GPU-0-0"):
        dist.init_cuda_group()
    assert calls["init"] == [], "NCCL must not start with two ranks on one GPU"


def test_distinct_gpus_on_two_hosts_with_equal_indices_pass():
    store = _store({0: "a:GPU-1", 1: "b:GPU-2"})
    dist.check_distinct_gpus(store, 2, 3, "a:GPU-3", datetime.timedelta(seconds=5))


def test_one_rank_group_gets_no_device_id(cuda):
    calls = cuda(4, 0, 0, _store({}))
    tdist.rendezvous = lambda *a, **k: iter([(tdist.HashStore(), 0, 1)])
    dist.init_cuda_group()
    ((_, kwargs),) = calls["init"]
    assert "device_id" not in kwargs  # as DeepSpeed: a bound device makes new_group an ncclCommSplit


def test_init_creates_the_group_before_deepspeed_which_reuses_it(monkeypatch):
    """``init("nccl")`` builds the group first; DeepSpeed's init_distributed then finds it initialised
    and does not call init_process_group with its own device_id=cuda:$LOCAL_RANK."""
    order = []
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for key, value in {**env, "MASTER_PORT": str(dist._free_port())}.items():
        monkeypatch.setenv(key, value)  # restored afterwards: later subprocess tests inherit os.environ
    real = tdist.init_process_group

    def spy(*a, **k):
        order.append(("init_process_group", a[0] if a else k.get("backend")))
        return real(*a, **k)

    def our_group():  # stands in for the NCCL group (gloo: this machine has no GPU)
        order.append("unmix")
        tdist.init_process_group("gloo", rank=0, world_size=1)

    monkeypatch.setattr(dist, "init_cuda_group", our_group)
    monkeypatch.setattr(tdist, "init_process_group", spy)
    try:
        dist.init("nccl")
        assert order == ["unmix", ("init_process_group", "gloo")]  # ours only, none from DeepSpeed
        assert tdist.is_initialized() and tdist.get_backend() == "gloo"
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_gpu_runs_turn_on_cudnn_benchmark(monkeypatch):
    """Fixed shapes every step: the loop lets cuDNN pick its fastest kernels on GPU runs, not on CPU ones."""
    from unmix.training import loop
    from unmix.training.config import load_config

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert loop.pick_device(load_config(None, ["data.device=cpu"]), 0).type == "cpu"
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loop, "local_cuda_device", lambda r: torch.device("cuda", r % 2))
    assert loop.pick_device(load_config(None, ["data.device=gpu"]), 3) == torch.device("cuda", 1)
    assert torch.backends.cudnn.benchmark is True


def _shutdown_rank(rank: int, port: int, out: str) -> None:
    import weakref

    import torch.distributed as tdist

    from unmix.training import dist as udist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank)
    )
    udist.init("gloo")
    world = weakref.ref(tdist.group.WORLD)
    import torchvision  # noqa: F401  (imports torch.distributed.nn after init, as the benches' backbones do)

    from unmix.training.simclr import gather_with_grad  # imported after init, as the trainer does

    x = torch.ones(3, 2, requires_grad=True)
    gather_with_grad(x * (rank + 1)).sum().backward()  # the backward's gloo work, as SimCLR's
    udist.shutdown()
    Path(out, f"rank{rank}").write_text(f"{tdist.is_initialized()} {world() is None} {x.grad[:, 0].tolist()}")


def test_shutdown_meets_every_rank_and_frees_the_group(tmp_path):
    """Both ranks leave the group and nothing keeps the group object alive after it: one still alive is
    freed at the interpreter's exit, where gloo aborted CPU ranks (SIGABRT). torch.distributed.nn, imported
    after init (by torchvision), held it through a default argument unless ``init`` imported it first;
    SimCLR's own gather must not hold it either."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_shutdown_rank, args=(port, str(tmp_path)), nprocs=2, join=True)  # raises on a rank's abort
    # x's gradient on rank r: (r + 1) per rank's loss, summed over the 2 ranks
    got = [(tmp_path / f"rank{r}").read_text() for r in (0, 1)]
    assert got == ["False True [2.0, 2.0, 2.0]", "False True [4.0, 4.0, 4.0]"]
