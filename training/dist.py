"""Process-group setup and the few collectives the methods need.

``deepspeed.init_distributed`` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. torchrun
and the ``deepspeed`` launcher set them; under ``srun`` only SLURM_* variables exist, so
:func:`map_slurm_env` derives them: MASTER_ADDR is the first node of ``SLURM_JOB_NODELIST`` and
MASTER_PORT is derived from the job id (so two jobs sharing a node do not collide). A plain
``python``/``unmix train`` process gets a one-process group on a free local port.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess

import torch
import torch.distributed as dist


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm hostlist (``node[1-3,5],gpu07``) without needing ``scontrol``."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,]*)", nodelist):
        prefix, ranges, suffix = match.group(1), match.group(2), match.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                width = len(lo)
                hosts.extend(f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part + suffix)
    return hosts


def first_node(nodelist: str) -> str:
    """First host of a Slurm node list: ``scontrol show hostnames`` when available, else own parsing."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise RuntimeError(f"SLURM_JOB_NODELIST={nodelist!r}: no host names in it")
    return hosts[0]


def map_slurm_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM_* when a launcher has not.

    Only applies inside an ``srun`` step (SLURM_PROCID set) and when RANK is not already set, so
    torchrun or the deepspeed launcher started from within an allocation keep their own values.
    Returns the variables it set.
    """
    env = os.environ if env is None else env
    if "RANK" in env or "SLURM_PROCID" not in env:
        return {}
    ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS") or "1"
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
    new = {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": ntasks,
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
    }
    if "MASTER_ADDR" not in env:
        new["MASTER_ADDR"] = first_node(nodelist) if nodelist else "127.0.0.1"
    if "MASTER_PORT" not in env:
        new["MASTER_PORT"] = str(15000 + int(re.sub(r"\D", "", job_id) or 0) % 20000)
    env.update(new)
    return new


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the process group (one process when no launcher set anything).

    Returns ``(rank, world_size, local_rank)``.
    """
    map_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        import deepspeed

        _skip_shm_comm_build()
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def _skip_shm_comm_build() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce op (minutes on first use).

    It only accelerates DeepSpeed's inference all-reduce on one CPU node; training collectives go
    through torch.distributed (gloo) either way. Set UNMIX_DS_SHM_COMM=1 to let DeepSpeed build it.
    """
    if os.environ.get("UNMIX_DS_SHM_COMM") == "1":
        return
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0 (no gradient); identity on one process."""
    if world_size() == 1:
        return x
    return gather_rows(x)


@torch.no_grad()
def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """The collective behind :func:`all_gather`, also on a one-process group (``unmix bench gpu``).

    Sent and received buffers are both plain contiguous (NCHW for images): ``torch.empty_like`` of a
    channels_last CUDA tensor is channels_last, and NCCL builds of torch before the fix of pytorch
    issue 163483 laid the received bytes out by the *outputs'* strides while the input was sent as
    NCHW, scrambling every gathered image without an error. The result is NCHW contiguous.
    """
    n = dist.get_world_size(group)
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n)]
    dist.all_gather(out, x.contiguous(), group=group)
    return torch.cat(out)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values (in place)."""
    if world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data, src)


def any_rank(flag: bool, device: torch.device | str = "cpu", group=None) -> bool:
    """True on every rank when ``flag`` is true on at least one (an all-reduce MAX over ``group``)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
