"""Run under ``torchrun --nproc_per_node 2`` by test_distributed.py: a few steps of each method on a
repeated batch, then check that the target network, the queue and the online weights are bitwise
identical on every rank. Rank 0 writes the results as JSON to argv[1]."""

from __future__ import annotations

import json
import os
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from unmix.training import dist  # noqa: E402
from unmix.training.bench_train import MemoryLoader  # noqa: E402
from unmix.training.config import load_config  # noqa: E402
from unmix.training.loop import setup, train_step  # noqa: E402

CASES = [  # method, Un-Mix, ZeRO stage, optimizer, lr
    ("moco_v2", True, 0, "sgd", 0.5),
    ("moco_v2", False, 2, "sgd", 0.5),
    ("byol", True, 2, "sgd", 0.5),
    ("byol", False, 0, "lars", 5.0),
    ("simclr", True, 0, "lars", 5.0),  # NT-Xent over both ranks' batches (gradient-carrying gather)
]
STEPS = 6


def _batch(rank: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)  # ranks see different data
    x1, x2 = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    lam = torch.full((4,), 0.3)
    return {"view1": x1, "view2": x2, "mixed": 0.3 * x1 + 0.7 * x1.flip(0), "lam": lam}


def _identical(tensors: list[torch.Tensor]) -> bool:
    flat = torch.cat([t.detach().float().reshape(-1) for t in tensors])
    gathered = dist.all_gather(flat.unsqueeze(0))
    return bool(all(torch.equal(gathered[0], g) for g in gathered[1:]))


@torch.no_grad()
def _loss_against(run, batch: dict[str, torch.Tensor], queue: torch.Tensor) -> float:
    """MoCo's loss on ``batch`` against a fixed queue (the repeated batch's own keys, which training
    enqueues, would otherwise become negatives as similar as the positives)."""
    current = run.method.queue.queue
    run.method.queue.queue = queue
    try:
        keys = run.method.targets(batch, torch.Generator().manual_seed(0))
        outs = run.engine.module(*run.method.online_inputs(batch, run.cfg.unmix.enabled))
        lam = batch["lam"] if run.cfg.unmix.enabled else None
        return float(run.method.loss(outs, keys, lam)[0])
    finally:
        run.method.queue.queue = current


def _shuffle_roundtrip() -> dict:
    """Shuffle-BN's bookkeeping: with a per-sample encoder (no BN) keys come back in input order, and the
    permutation really spreads samples over ranks (with BN, keys then differ from a local forward)."""
    from torch import nn

    from unmix.training.heads import Network
    from unmix.training.moco import shuffled_embed

    torch.manual_seed(0)
    per_sample = Network(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    with_bn = Network(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), nn.BatchNorm1d(5))
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(dist.rank()))
    k = shuffled_embed(per_sample, x, torch.Generator().manual_seed(1))
    k_bn = shuffled_embed(with_bn, x, torch.Generator().manual_seed(1))
    with torch.no_grad():
        return {
            "order_kept": bool(torch.allclose(k, per_sample.embed(x), atol=1e-6)),
            "bn_stats_mixed_across_ranks": not bool(torch.allclose(k_bn, with_bn.embed(x), atol=1e-4)),
        }


class _Probe(torch.nn.Module):
    """Records whether its input is channels_last (the layout of the rest of the step on CUDA)."""

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.is_contiguous(memory_format=torch.channels_last))
        return x


def _gather_channels_last() -> dict:
    """Shuffle-BN's image gather on channels_last inputs (what the loop feeds on CUDA): every rank's
    images arrive intact and in rank order; under bf16 autocast they travel as bf16."""
    from torch import nn

    from unmix.training.heads import Network
    from unmix.training.moco import gather_images, shuffled_embed

    def images(r: int) -> torch.Tensor:  # distinct values in every position, per rank
        x = torch.arange(4 * 3 * 5 * 6, dtype=torch.float32).reshape(4, 3, 5, 6) / 7 + 1000 * r
        return x.contiguous(memory_format=torch.channels_last)

    world, me = dist.world_size(), dist.rank()
    x = images(me)
    expected = torch.cat([images(r) for r in range(world)])
    gathered = dist.all_gather(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = gather_images(x)
        torch.manual_seed(0)
        per_sample = Network(nn.Flatten(), nn.Linear(3 * 5 * 6, 5))
        k = shuffled_embed(per_sample, x / 1000, torch.Generator().manual_seed(2))
        k_local = per_sample.embed(x / 1000)
        seen = []  # the memory format the key encoder receives from Shuffle-BN's gather
        probe = nn.Sequential(_Probe(seen), nn.Flatten(), nn.Linear(3 * 5 * 6, 5))
        shuffled_embed(Network(probe, nn.Identity()), x, torch.Generator().manual_seed(3))
    return {
        "encoder_input_channels_last": seen == [True],
        "fp32_exact": bool(torch.equal(gathered, expected)),
        "fp32_channels_last": gathered.is_contiguous(memory_format=torch.channels_last),
        "bf16_channels_last": low.is_contiguous(memory_format=torch.channels_last),
        "bf16_dtype": str(low.dtype),
        "bf16_exact": bool(torch.equal(low, expected.to(torch.bfloat16))),
        "autocast_order_kept": bool(torch.allclose(k.float(), k_local.float(), atol=1e-2, rtol=1e-2)),
    }


def main() -> None:
    results = []
    for name, unmix, zero, opt, lr in CASES:
        cfg = load_config(
            None,
            [
                f"method.name={name}",
                f"unmix.enabled={str(unmix).lower()}",
                f"deepspeed.zero_stage={zero}",
                "deepspeed.precision=fp32",
                "data.device=cpu",
                "data.crop=16",
                "model.arch=resnet10",
                "model.width=16",
                "optim.batch_size=8",
                f"optim.optimizer={opt}",
                "mlflow.enabled=false",
                "optim.weight_decay=0",
                "method.moco.K=2048",
                "method.moco.dim=16",
                "method.moco.hidden_dim=32",
                "method.moco.m=0.9",
                "method.byol.proj_hidden_dim=32",
                "method.byol.proj_dim=16",
                "method.byol.pred_hidden_dim=32",
                "method.simclr.proj_hidden_dim=32",
                "method.simclr.proj_dim=16",
            ],
        )
        batch = _batch(dist.rank() if dist.world_size() > 1 else int(os.environ.get("RANK", 0)))
        run = setup(cfg, loader_factory=lambda *a, b=batch: MemoryLoader([b]))
        start_identical = _identical(list(run.method.replicated()) or [torch.zeros(1)])  # SimCLR: none
        queue0 = run.method.queue.queue.clone() if getattr(run.method, "queue", None) is not None else None
        losses, fixed_queue_losses = [], [_loss_against(run, batch, queue0)] if queue0 is not None else []
        for step in range(STEPS):
            loss, _, _ = train_step(run, batch, step, lr, run.method.momentum(step, 100))
            losses.append(float(loss))
        if queue0 is not None:
            fixed_queue_losses.append(_loss_against(run, batch, queue0))
        target = list(run.method.replicated()) or [torch.zeros(1)]  # target (+ queue); SimCLR: none
        results.append(
            {
                "case": f"{name} unmix={unmix} zero={zero} {opt}",
                "world": dist.world_size(),
                "losses": losses,
                "fixed_queue_losses": fixed_queue_losses,
                "target_identical_at_start": start_identical,
                "target_identical": _identical(target),
                "queue_identical": _identical([run.method.queue.queue])
                if getattr(run.method, "queue", None) is not None
                else None,
                "online_identical": _identical(list(run.engine.module.parameters())),
            }
        )
    results.append({"case": "shuffle_bn_roundtrip", **_shuffle_roundtrip()})
    results.append({"case": "gather_channels_last", **_gather_channels_last()})
    if dist.rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.shutdown()  # as `unmix train` ends: left to the exit, gloo aborted a rank once in CI


if __name__ == "__main__":
    main()
