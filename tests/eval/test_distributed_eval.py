"""Two CPU ranks (gloo): DDP keeps the head identical, val counted once, sharded kNN and logreg equal one
process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(out: Path, features: str, world_size: int = 2) -> list[dict]:
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1",  # an abort prints every thread's Python stack
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), str(out), features],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, f"rank {procs.index(p)} exited {p.returncode}:\n{log[-3000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


@pytest.mark.parametrize("features", ["cached", "augmented"])
def test_two_ranks(tmp_path, features):
    r0, r1 = _run_ranks(tmp_path, features)
    # teardown freed the process group, though torchvision was imported after it was made
    assert r0["group_freed"] and r1["group_freed"]
    # DDP: the classifier is the same on both ranks after training on different shards
    assert r0["head_weight"] == r1["head_weight"]
    # exactly once: 41 val samples split 20/21, counted once overall
    assert r0["linear_val_samples"] == r1["linear_val_samples"] == 41
    assert r0["linear_top1"] == r1["linear_top1"]
    assert r0["knn_total"] == r1["knn_total"] == 41
    assert r0["train_rows"] + r1["train_rows"] == 70  # the kNN bank stays sharded
    # the SGD (lr, weight_decay) search: the same held-out scores and choice on both ranks, one head
    assert r0["sgd_search"] == r1["sgd_search"] and len(r0["sgd_search"]) == 4
    assert r0["sgd_chosen"] == r1["sgd_chosen"] and r0["sgd_head_weight"] == r1["sgd_head_weight"]
    # [lr, wd, top1, top5, total, loss]: the held-out rows of both ranks counted once, 7 of 70 (10 %)
    assert all(s[4] == 7 for s in r0["sgd_search"]), r0["sgd_search"]
    assert r0["sgd_chosen"] == min(r0["sgd_search"], key=lambda s: s[5])[:2]
    assert r0["sgd_val_samples"] == 41 and r0["sgd_top1"] == r1["sgd_top1"]

    if features == "cached":
        # sharded kNN (local top-k, gathered and merged) equals kNN on one process
        sys.path.insert(0, str(WORKER.parent))
        try:
            import dist_worker
        finally:
            sys.path.pop(0)
        from unmix.eval.features import extract_features, freeze
        from unmix.training.knn import knn_evaluate

        net = freeze(dist_worker.backbone())
        kw = dict(batch_size=8, split="val", shard_id=0, num_shards=1)
        f_tr, y_tr = extract_features(
            net, dist_worker.ShardedLoader(*dist_worker.DATA["train"], **kw), torch.device("cpu")
        )
        f_va, y_va = extract_features(
            net, dist_worker.ShardedLoader(*dist_worker.DATA["val"], **kw), torch.device("cpu")
        )
        single = knn_evaluate(f_va, y_va, f_tr, y_tr, 3, k=10, t=0.1)
        assert r0["knn_top1"] == pytest.approx(single.top1) and r1["knn_top5"] == pytest.approx(single.top5)

        # logreg: gradient sums all-reduced, held-out split drawn on all ranks' labels in rank order ->
        # the same search, the same l2 and the same probe as one process on all rows
        from unmix.eval.logreg import logreg_eval

        one = logreg_eval(f_tr, y_tr, f_va, y_va, 3, seed=0, chunk_rows=16)
        for r in (r0, r1):
            assert r["logreg_val_samples"] == 41
            assert (r["logreg_top1"], r["logreg_top5"], r["logreg_l2"]) == (one.top1, one.top5, one.l2)
            assert r["logreg_search"] == [s["holdout_top1"] for s in one.search]
        assert r0["logreg_weight"] == r1["logreg_weight"]  # rank 0's probe, broadcast
        torch.testing.assert_close(
            torch.tensor(r0["logreg_weight"]), one.head.weight.detach().flatten(), rtol=1e-3, atol=1e-3
        )
