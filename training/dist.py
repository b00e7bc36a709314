"""Process-group setup and the few collectives the methods need.

``deepspeed.init_distributed`` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. torchrun
and the ``deepspeed`` launcher set them; under ``srun`` only SLURM_* variables exist, so
:func:`map_slurm_env` derives them: MASTER_ADDR is the first node of ``SLURM_JOB_NODELIST`` and
MASTER_PORT is derived from the job id (so two jobs sharing a node do not collide). A plain
``python``/``unmix train`` process gets a one-process group on a free local port.

On CUDA, :func:`init` makes the process group itself before DeepSpeed sees it (``deepspeed.init_distributed``
reuses an initialised group): DeepSpeed would pass ``device_id=cuda:$LOCAL_RANK``, an invalid ordinal
wherever a task sees fewer GPUs than its local rank (``srun --gpus-per-task=1``, ``--gpu-bind``); the
device here follows the project's one rule, :func:`unmix.pipeline.devices.local_cuda_index`
(``LOCAL_RANK % visible``). Before NCCL starts, every rank publishes its GPU's UUID in the rendezvous
store, and two ranks on one physical GPU (a binding that hands a task the same device as a neighbour)
stop the run with a message naming both.
"""

from __future__ import annotations

import datetime
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


def import_world_binders() -> None:
    """Import, before any process group exists, the modules that bind ``group.WORLD`` when imported.

    ``torch.distributed.nn`` (imported by torchvision and ``torch._dynamo``) takes ``group=group.WORLD``
    as a default argument at import time. Imported after ``init_process_group`` it holds the group past
    ``destroy_process_group`` (gloo's threads keep running) until the interpreter's exit, where freeing it
    aborted CPU ranks now and then ("terminate called without an active exception", SIGABRT) after the
    work was done. Imported first, it binds ``None``. Call before creating the group.
    """
    import torch.distributed.nn  # noqa: F401


def init(backend: str | None = None) -> tuple[int, int, int]:
    """Initialise the process group (one process when no launcher set anything).

    With ``backend="nccl"`` (the default when CUDA is available) the current device is set by
    :func:`unmix.pipeline.devices.local_cuda_index` and the group is created here, bound to it
    (:func:`init_cuda_group`), before DeepSpeed. Returns ``(rank, world_size, local_rank)``.
    """
    map_slurm_env()
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    if not dist.is_initialized():
        import deepspeed

        import_world_binders()
        _skip_shm_comm_build()
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            init_cuda_group()
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"])


def init_cuda_group(timeout: datetime.timedelta | None = None) -> torch.device:
    """The NCCL process group of this rank, on the device the project's rule gives it; returns the device.

    Sets the current device to ``cuda:(LOCAL_RANK % visible)``, rendezvous through ``env://`` (RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT), refuses two ranks on one physical GPU
    (:func:`check_distinct_gpus`), then ``init_process_group("nccl", device_id=...)``. A one-rank group
    gets no ``device_id`` (as DeepSpeed does: a bound device makes every later ``new_group`` an
    ``ncclCommSplit`` with no peer to reach).
    """
    from unmix.pipeline.devices import local_cuda_index, local_rank_from_env

    index = local_cuda_index(local_rank_from_env())
    torch.cuda.set_device(index)
    device = torch.device("cuda", index)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = timeout or datetime.timedelta(minutes=30)
    store, rank, world = next(dist.rendezvous("env://", rank=rank, world_size=world, timeout=timeout))
    if world > 1:
        check_distinct_gpus(store, rank, world, gpu_identity(index), timeout)
    extra = {"device_id": device} if world > 1 else {}
    dist.init_process_group("nccl", store=store, rank=rank, world_size=world, timeout=timeout, **extra)
    return device


def gpu_identity(index: int) -> str:
    """``host:UUID`` of visible CUDA device ``index`` (the PCI bus id where the UUID is unavailable)."""
    props = torch.cuda.get_device_properties(index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        ident = f"GPU-{uuid}"
    else:
        ident = f"pci {props.pci_domain_id:04x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}"
    return f"{socket.gethostname()}:{ident}"


def check_distinct_gpus(
    store: dist.Store, rank: int, world: int, identity: str, timeout: datetime.timedelta | None = None
) -> None:
    """Raise RuntimeError naming both ranks when another rank computes on the same physical GPU.

    Every rank writes ``identity`` (:func:`gpu_identity`) under its own key of the rendezvous ``store``
    and reads all of them (one ``multi_get``). NCCL itself would fail later with "Duplicate GPU detected"
    or hang; this says which ranks and which binding to fix.
    """
    store.set(f"unmix/gpu/{rank}", identity)
    keys = [f"unmix/gpu/{r}" for r in range(world)]
    if timeout is not None:
        store.wait(keys, timeout)
    else:
        store.wait(keys)
    seen: dict[str, int] = {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    for r, value in enumerate(store.multi_get(keys)):
        ident = value.decode()
        if ident in seen:  # every rank reads the same keys, so every rank stops with this message
            raise RuntimeError(
                f"ranks {seen[ident]} and {r} both compute on GPU {ident} (LOCAL_RANK % visible devices "
                "maps them to one device): give each task its own GPU (srun --gpus-per-task=1, or as "
                f"many tasks per node as GPUs); this rank's CUDA_VISIBLE_DEVICES={visible!r}"
            )
        seen.setdefault(ident, r)


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
    """Concatenate ``x`` from every rank along dim 0 (no gradient), in ``x``'s memory format; identity on one
    process."""
    if world_size() == 1:
        return x
    return gather_rows(x)


@torch.no_grad()
def gather_rows(x: torch.Tensor, group=None) -> torch.Tensor:
    """The collective behind :func:`all_gather`, also on a one-process group (``unmix bench gpu``).

    The result has ``x``'s memory format: a channels_last batch of images (what the model takes on
    CUDA) comes back channels_last, so the key encoder's convolutions run in the layout of the rest of
    the step, without a copy. Sent and received buffers are both plain contiguous: a channels_last image
    batch travels as its NHWC bytes (``permute`` views, no copy) and the gathered NHWC rows are viewed
    back as NCHW with channels_last strides. ``torch.empty_like`` of a channels_last CUDA tensor is
    channels_last, and NCCL builds of torch before the fix of pytorch issue 163483 laid the received
    bytes out by the *outputs'* strides while the input was sent in another order, scrambling every
    gathered image without an error: no receive buffer here has non-contiguous strides.
    """
    if _is_channels_last(x):
        nhwc = gather_rows(x.permute(0, 2, 3, 1), group)  # (W*N)xHxWxC, contiguous
        return nhwc.permute(0, 3, 1, 2)  # (W*N)xCxHxW with channels_last strides: a view
    n = dist.get_world_size(group)
    x = x.contiguous()
    out = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(n)]
    dist.all_gather(out, x, group=group)
    return torch.cat(out)


def _is_channels_last(x: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last and not also plain contiguous (C = 1 or H = W = 1 are both)."""
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


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


def shutdown() -> None:
    """Leave the process group at the normal end of a process (a finished run, or an agreed stop for
    requeue). Every rank first meets at a barrier, so none tears the group down while another's collective
    is in flight; the group is then destroyed before the interpreter exits. A group still alive at the
    exit is freed during interpreter teardown, where gloo aborted CPU ranks ("terminate called without an
    active exception", SIGABRT); so nothing may hold it past this call (tested: SimCLR's gather, see
    :func:`unmix.training.simclr.gather_with_grad`, and torchvision imported after :func:`init`, see
    :func:`import_world_binders`)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
