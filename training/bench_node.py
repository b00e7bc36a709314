"""``unmix bench gpu --nproc N``: N ranks on this node, launched by the command itself, proving the node.

The parent (:func:`launch`) starts N processes of this module with RANK / WORLD_SIZE / LOCAL_RANK and a
local rendezvous, waits for them within the time budget, and turns rank 0's JSON into report rows. Each
rank (:func:`worker`) runs the checks below on the run's own process group (NCCL; gloo with ``--dry-run``,
which CI runs: 2 CPU ranks, a tiny model). A check's row fails when it failed on any rank.

- ``node shuffle-bn``: MoCo's Shuffle-BN across ranks equals an unshuffled reference computed locally
  from the gathered global batch (the same permutation, each chunk through its own train-mode BN,
  unshuffled), with channels_last images under bf16 autocast on the GPU; a per-sample encoder returns
  the keys in input order;
- ``node syncbn``: SyncBatchNorm's output and running statistics equal BatchNorm on the gathered global
  batch (CUDA only: torch's SyncBatchNorm has no CPU kernel);
- ``node moco key gather + enqueue``: every rank enqueues the same gathered keys (rank order), so the
  queues are bitwise identical on every rank;
- ``node zero-<1|2> steps``: two training steps of MoCo v2 + Un-Mix under ZeRO 1 / 2; online weights,
  target network and queue bitwise identical on every rank afterwards;
- ``node checkpoint write + resume``: a ZeRO-1 checkpoint written by all ranks into one directory, loaded
  by a freshly built run: weights, target, queue and the next step's loss equal the original's;
- ``node throughput <method> + unmix``: ResNet-50, bf16, the node's ranks together, from ``--data`` shards
  or the synthetic source: images/s per GPU (min and mean over ranks), the data-wait fraction and the
  peak memory per GPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

WORKER_GRACE_S = 120  # time the ranks get past the budget's remainder to start and report


# ------------------------------------------------------------------------------------------- parent


def default_nproc(dry_run: bool) -> int:
    """All visible GPUs; 2 (gloo, CPU) for ``--dry-run``."""
    if dry_run:
        return 2
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict[str, Any], nproc: int, timeout_s: float) -> tuple[list[dict], str]:
    """Run :func:`worker` on ``nproc`` local ranks; returns (rank 0's rows, an error line or "")."""
    with tempfile.TemporaryDirectory(prefix="unmix-bench-node-") as tmp:
        spec = {**spec, "out": str(Path(tmp) / "rows.json"), "workdir": tmp}
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), LOCAL_WORLD_SIZE=str(nproc))
        if spec["dry_run"]:
            base.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        procs, logs = [], []
        for r in range(nproc):
            log = open(Path(tmp) / f"rank{r}.log", "w+")  # noqa: SIM115 (closed below)
            env = {**base, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r)}
            cmd = [sys.executable, "-m", "unmix.training.bench_node", str(spec_file)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            logs.append(log)
        deadline = time.monotonic() + timeout_s
        error = ""
        try:
            for r, p in enumerate(procs):
                try:
                    rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    error = f"rank {r} did not finish within {timeout_s:.0f} s"
                    break
                if rc != 0 and not error:
                    error = f"rank {r} exited {rc}: {_tail(logs[r])}"
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            tails = [_tail(log) for log in logs]
            for log in logs:
                log.close()
        out = Path(spec["out"])
        rows = json.loads(out.read_text()) if out.is_file() else []
        if not rows and not error:
            error = f"rank 0 wrote no results: {tails[0]}"
        return rows, error


def _tail(log, n: int = 600) -> str:
    log.flush()
    log.seek(0)
    text = log.read().strip()
    lines = [x for x in text.splitlines() if "[WARNING]" not in x]
    return " | ".join(lines[-6:])[-n:]


# ------------------------------------------------------------------------------------------- worker


def _overrides(spec: dict[str, Any], method: str, zero: int, batch: int, shards: bool = False) -> list[str]:
    """ResNet-50 bf16 on the GPU (``bench_gpu.r50_overrides``), from ``--data`` when ``shards`` and given,
    else the synthetic source; a tiny fp32 CPU model for ``--dry-run``."""
    from unmix.training.bench_gpu import r50_overrides

    shards = bool(shards and spec.get("data"))
    out = r50_overrides(method, True, batch, zero, source="dali" if shards else "synthetic")
    if shards:
        out += [f"data.train={spec['data']}", f"data.threads={spec['threads']}"]
    if spec["dry_run"]:
        out = [o for o in out if not o.startswith(("model.", "data.device", "data.crop", "deepspeed.prec"))]
        out += ["model.arch=resnet10", "model.width=16", "data.device=cpu", "data.crop=32"]
        out += ["deepspeed.precision=fp32", "method.moco.K=256", "method.moco.dim=16"]
        out += ["method.moco.hidden_dim=32", f"data.synthetic_samples={batch * 64}"]
    return out


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def _same_everywhere(t: torch.Tensor) -> bool:
    """Whether ``t`` is bitwise identical on every rank."""
    from unmix.training import dist

    flat = t.detach().float().reshape(1, -1).contiguous()
    gathered = dist.all_gather(flat)
    return bool(all(torch.equal(gathered[0], g) for g in gathered[1:]))


def _flat_state(run) -> tuple[torch.Tensor, torch.Tensor]:
    """(online weights, the method's replicated state) of a run, each flattened to one fp32 vector.

    The replicated state is what :meth:`Method.replicated` names: the tensors every rank must hold
    bitwise equal (MoCo: key encoder and queue; BYOL: target network; SimCLR: nothing).
    """
    online = torch.cat([p.detach().float().reshape(-1) for p in run.engine.module.parameters()])
    tensors = run.method.replicated()
    if not tensors:
        return online, torch.zeros(1, device=online.device)
    return online, torch.cat([t.detach().float().reshape(-1).to(online.device) for t in tensors])


def check_shuffle_bn(device: torch.device) -> tuple[str, dict]:
    from torch import nn

    from unmix.training import dist
    from unmix.training.heads import Network
    from unmix.training.moco import shuffled_embed

    world, rank = dist.world_size(), dist.rank()
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(8, 3, 16, 16, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    with_bn = Network(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.BatchNorm1d(8)
    ).to(device)
    per_sample = Network(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Identity()
    )
    per_sample = per_sample.to(device)
    low = device.type == "cuda"
    tol = 3e-2 if low else 1e-5
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low), torch.no_grad():
        k = shuffled_embed(with_bn, x, torch.Generator().manual_seed(7))
        # the unshuffled reference: the global batch, the same permutation, one BN batch per rank
        x_all = dist.all_gather(x)
        perm = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(7)).to(device)
        chunks = [with_bn.embed(c) for c in x_all[perm].chunk(world)]
        ref = torch.cat(chunks)[torch.argsort(perm)].view(world, x.shape[0], -1)[rank]
        local = with_bn.embed(x)  # what a rank-local BN would give (must differ when world > 1)
        order = shuffled_embed(per_sample, x, torch.Generator().manual_seed(8))
        order_ref = per_sample.embed(x)
    if not torch.allclose(k.float(), ref.float(), atol=tol, rtol=tol):
        raise AssertionError(
            f"keys differ from the unshuffled reference by {float((k - ref).abs().max()):.3g}"
        )
    if not torch.allclose(order.float(), order_ref.float(), atol=tol, rtol=tol):
        raise AssertionError("a per-sample encoder's keys did not come back in input order")
    if world > 1 and torch.allclose(k.float(), local.float(), atol=tol, rtol=tol):
        raise AssertionError("Shuffle-BN keys equal a rank-local BN: the shuffle did not cross ranks")
    dtype = "bf16 channels_last" if low else "fp32 channels_last"
    return f"{world} ranks: keys = unshuffled reference ({dtype}), BN batches span ranks", {}


def check_sync_bn(device: torch.device) -> tuple[str, dict] | dict:
    from torch import nn

    from unmix.training import dist

    if device.type != "cuda":
        return {"status": "skip", "detail": "torch's SyncBatchNorm runs on CUDA only"}
    rank = dist.rank()
    x = torch.randn(8, 16, 7, 7, generator=torch.Generator().manual_seed(200 + rank)).to(device)
    torch.manual_seed(0)
    sync = nn.SyncBatchNorm(16).to(device)
    plain = nn.BatchNorm2d(16).to(device)
    plain.load_state_dict(sync.state_dict())
    y = sync(x)
    x_all = dist.all_gather(x)
    ref = plain(x_all).view(dist.world_size(), *x.shape)[rank]
    if not torch.allclose(y, ref, atol=1e-4, rtol=1e-4):
        raise AssertionError(
            f"SyncBatchNorm differs from BN on the global batch by {float((y - ref).abs().max()):.3g}"
        )
    for name in ("running_mean", "running_var"):
        if not torch.allclose(getattr(sync, name), getattr(plain, name), atol=1e-5, rtol=1e-4):
            raise AssertionError(f"SyncBatchNorm {name} differs from the global batch's")
    return "output and running statistics = BatchNorm on the global batch", {}


def check_key_gather(device: torch.device) -> tuple[str, dict]:
    from unmix.training import dist
    from unmix.training.queue import KeyQueue

    world, rank = dist.world_size(), dist.rank()
    queue = KeyQueue(32, 64, seed=3, device=device)
    keys = torch.randn(8, 32, generator=torch.Generator().manual_seed(300 + rank)).to(device)
    gathered = dist.all_gather(keys)
    expected = torch.cat(
        [torch.randn(8, 32, generator=torch.Generator().manual_seed(300 + r)) for r in range(world)]
    )
    if not torch.equal(gathered.cpu(), expected):
        raise AssertionError("the gathered keys are not every rank's keys in rank order")
    for _ in range(3):  # wraps around the 64-key queue with 8 ranks
        queue.enqueue(gathered)
    if not _same_everywhere(queue.queue) or not _same_everywhere(torch.tensor([float(queue.ptr)])):
        raise AssertionError("the queues differ between ranks after enqueueing the gathered keys")
    return f"{world} x 8 keys gathered in rank order; queues identical on every rank", {}


def _steps(run, n: int, wait: list[float] | None = None) -> tuple[float, list[float]]:
    from unmix.training.loop import train_step

    lr = run.base_lr
    it = iter(_endless(run.loader))
    losses = []
    t0 = time.perf_counter()
    for i in range(n):
        tw = time.perf_counter()
        batch = next(it)
        if wait is not None:
            wait.append(time.perf_counter() - tw)
        loss, _, _ = train_step(run, batch, run.state["step"] + i, lr, run.method.momentum(i, 10**6))
        losses.append(loss)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    run.state["step"] += n
    return time.perf_counter() - t0, [float(v) for v in losses]


def _endless(loader):
    while True:
        yield from loader


def _free(run) -> None:
    import gc

    del run
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_zero(spec: dict[str, Any], stage: int) -> tuple[str, dict]:
    from unmix.training.config import load_config
    from unmix.training.loop import setup

    run = setup(load_config(None, _overrides(spec, "moco_v2", stage, spec["batch"] * run_world())))
    try:
        before = _flat_state(run)[0].clone()
        _, losses = _steps(run, 2)
        online, replicated = _flat_state(run)
        if run.engine.zero_optimization_stage() != stage:
            raise AssertionError(f"the engine runs ZeRO stage {run.engine.zero_optimization_stage()}")
        if not all(torch.isfinite(torch.tensor(losses))):
            raise AssertionError(f"non-finite loss {losses}")
        if torch.equal(before, online):
            raise AssertionError("the optimizer steps changed no weight")
        same = [_same_everywhere(t) for t in (online, replicated)]
        if not all(same):
            names = ("online weights", "method state (target, queue)")
            wrong = [n for n, ok in zip(names, same, strict=True) if not ok]
            raise AssertionError(f"differs between ranks: {', '.join(wrong)}")
        same_text = "weights and method state (target, queue) identical on every rank"
        return f"2 steps, loss {losses[-1]:.3f}; {same_text}", {"losses": losses}
    finally:
        _free(run)


def run_world() -> int:
    from unmix.training import dist

    return dist.world_size()


def check_checkpoint(spec: dict[str, Any]) -> tuple[str, dict]:
    from unmix.training import checkpoint, dist
    from unmix.training.checkpoint_state import ClientState
    from unmix.training.config import load_config, to_dict
    from unmix.training.loop import setup, train_step

    cfg = load_config(None, _overrides(spec, "moco_v2", 1, spec["batch"] * run_world()))
    ckpt_dir = Path(spec["workdir"]) / "checkpoints"
    first = setup(cfg)
    try:
        _steps(first, 2)
        client = ClientState(2, 0, 2, to_dict(cfg), first.method.state_dict(), mlflow_run_id=None)
        path = checkpoint.save(first.engine, ckpt_dir, client, {"loader": first.loader.state_dict()}, keep=1)
        saved = [t.clone() for t in _flat_state(first)]
        batch = next(iter(first.loader))
        loss_a = float(train_step(first, batch, 2, first.base_lr, first.method.momentum(2, 10**6))[0])
    finally:
        _free(first)
    if checkpoint.verify(path) is not None:
        raise AssertionError(f"{path}: {checkpoint.verify(path)}")
    second = setup(cfg)
    try:
        client, _ = checkpoint.load(second.engine, path)
        second.method.load_state_dict(client.method)
        loaded = _flat_state(second)
        names = ("online weights", "method state (target, queue)")
        wrong = [n for n, a, b in zip(names, saved, loaded, strict=True) if not torch.equal(a, b)]
        if wrong:
            raise AssertionError(f"after loading, {', '.join(wrong)} differ from the saved run")
        loss_b = float(train_step(second, batch, 2, second.base_lr, second.method.momentum(2, 10**6))[0])
        if abs(loss_a - loss_b) > 1e-3 * max(1.0, abs(loss_a)):
            raise AssertionError(f"the next step's loss {loss_b:.6f} after resuming != {loss_a:.6f}")
        files = sum(1 for p in path.rglob("*") if p.is_file())
        return f"{files} files by {dist.world_size()} ranks, resumed: state and next loss equal", {
            "loss": loss_a
        }
    finally:
        _free(second)


def check_throughput(spec: dict[str, Any], method: str) -> tuple[str, dict]:
    from unmix.training import dist
    from unmix.training.config import load_config
    from unmix.training.loop import setup

    batch = spec["batch"]
    run = setup(load_config(None, _overrides(spec, method, 0, batch * run_world(), shards=True)))
    try:
        _steps(run, spec["warmup"])
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        wait: list[float] = []
        seconds, losses = _steps(run, spec["steps"], wait)
        peak = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else 0.0
        mine = {
            "images_per_s": spec["steps"] * batch / seconds,
            "data_wait": sum(wait) / seconds,
            "peak_gib": peak,
        }
        per_rank: list[Any] = [None] * dist.world_size()
        torch.distributed.all_gather_object(per_rank, mine)
        if not all(torch.isfinite(torch.tensor(losses))):
            raise AssertionError(f"non-finite loss {losses}")
        ips = [r["images_per_s"] for r in per_rank]
        waits = [r["data_wait"] for r in per_rank]
        peaks = [r["peak_gib"] for r in per_rank]
        values = {
            "per_rank": per_rank,
            "images_per_s_per_gpu_mean": sum(ips) / len(ips),
            "images_per_s_per_gpu_min": min(ips),
            "data_wait_fraction_max": max(waits),
            "peak_gib_max": max(peaks),
            "batch_per_gpu": batch,
            "source": "shards" if spec.get("data") else "synthetic",
        }
        figure = (
            f"{values['images_per_s_per_gpu_mean']:8.1f} img/s per GPU (min {min(ips):.1f}), data wait "
            f"{max(waits):.1%}, peak {max(peaks):.1f} GiB, batch {batch}/GPU, {values['source']}"
        )
        if spec["dry_run"]:
            figure += " (dry run: tiny model on CPU, not a measurement)"
        return figure, values
    finally:
        _free(run)


def worker(spec: dict[str, Any]) -> None:
    """One rank: every check in order; rank 0 writes the rows (a check fails when any rank failed)."""
    from unmix.training import dist

    dist.init("gloo" if spec["dry_run"] else "nccl")
    device = _device()
    rows: list[dict[str, Any]] = []

    def run(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.perf_counter()
        try:
            out = fn()
            row = out if isinstance(out, dict) else {"status": "pass", "figure": out[0], "values": out[1]}
        except Exception as exc:  # reported; the ranks stay in step because every rank runs every check
            row = {"status": "fail", "detail": f"{type(exc).__name__}: {exc}"[:500]}
        everyone: list[Any] = [None] * dist.world_size()
        torch.distributed.all_gather_object(everyone, row)
        failed = [(r, x) for r, x in enumerate(everyone) if x["status"] == "fail"]
        if failed:
            r, x = failed[0]
            row = {"status": "fail", "detail": f"rank {r}: {x['detail']}"}
        rows.append({"name": name, "seconds": time.perf_counter() - t0, **row})

    run("node shuffle-bn", lambda: check_shuffle_bn(device))
    run("node syncbn", lambda: check_sync_bn(device))
    run("node moco key gather + enqueue", lambda: check_key_gather(device))
    for stage in (1, 2):
        run(f"node zero-{stage} steps", lambda s=stage: check_zero(spec, s))
    run("node checkpoint write + resume", lambda: check_checkpoint(spec))
    for method in ("moco_v2", "byol"):
        run(f"node throughput {method} + unmix", lambda m=method: check_throughput(spec, m))
    if dist.rank() == 0:
        Path(spec["out"]).write_text(json.dumps(rows, default=str))
    dist.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(json.loads(Path(sys.argv[1]).read_text()))
