"""One rank of test_knn_monitor.py's two-process check: the monitor under a gloo process group.

argv: train shards, val shards, output JSON (written by rank 0). RANK/WORLD_SIZE/MASTER_* from the env.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from unmix.training.backbones import build_backbone
from unmix.training.config import load_config
from unmix.training.knn_monitor import KnnMonitor


def main() -> None:
    train, val, out = sys.argv[1:4]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same backbone on every rank
    backbone = build_backbone("resnet10", crop=8, width=8)
    cfg = load_config(
        None,
        [f"data.train={train}", f"data.val={val}", "data.device=cpu", "data.crop=8", "data.threads=1"]
        + ["eval.knn_every_epochs=1", "eval.knn_k=20"],
    )
    result = KnnMonitor(cfg, rank, world, torch.device("cpu"), 64).evaluate(backbone)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"top1": result.top1, "top5": result.top5, "total": result.total}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
