"""One rank of the distributed evaluation test (run as a script by test_distributed_eval.py).

Usage: RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python dist_worker.py OUT_DIR FEATURES
Writes OUT_DIR/rank<r>.json with the linear, kNN and logreg results of this rank.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import weakref
from pathlib import Path

import torch


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose red-channel mean encodes one of 3 classes."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.5
    x[:, 0] += (y.float() - 1).view(-1, 1, 1) * 2
    return x, y


class ShardedLoader:
    """Like build_eval_loader: rank r gets the contiguous r-th part; the last batch may be smaller."""

    def __init__(self, images, labels, batch_size, split, shard_id, num_shards, **_):
        n = len(labels)
        lo, hi = n * shard_id // num_shards, n * (shard_id + 1) // num_shards
        self.images, self.labels, self.batch_size, self.split = (
            images[lo:hi],
            labels[lo:hi],
            batch_size,
            split,
        )

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for i in range(0, len(self.labels), self.batch_size):
            x = self.images[i : i + self.batch_size]
            yield {
                "image": x.flip(3) if self.split == "train" else x.clone(),
                "label": self.labels[i : i + self.batch_size].clone(),
            }


def backbone() -> torch.nn.Module:
    from unmix.training.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("resnet10", crop=8)


DATA = {"train": task(70, 1), "val": task(41, 2)}  # 41 val samples: uneven split over 2 ranks


def main() -> None:
    from unmix.eval import distributed
    from unmix.eval.features import extract_features, freeze
    from unmix.eval.linear import linear_eval, sgd_probe
    from unmix.eval.logreg import logreg_eval
    from unmix.eval.protocols import fixed, moco_protocol
    from unmix.training.knn import knn_evaluate

    out, features = Path(sys.argv[1]), sys.argv[2]
    ctx = distributed.setup("cpu")
    world = weakref.ref(torch.distributed.group.WORLD)
    net = freeze(backbone())  # imports torchvision (and torch.distributed.nn) after the group exists
    proto = fixed(moco_protocol(), epochs=2, batch_size=16, lr=0.5, crop=8, device="cpu", features=features)

    def make_loader(shards, **kw):
        return ShardedLoader(*DATA[shards], **kw)

    lin = linear_eval(net, 3, proto, ctx, make_loader, "train", "val")
    kw = dict(batch_size=8, split="val", shard_id=ctx.rank, num_shards=ctx.world_size)
    f_tr, y_tr = extract_features(net, make_loader("train", **kw), ctx.device)
    f_va, y_va = extract_features(net, make_loader("val", **kw), ctx.device)
    knn = knn_evaluate(f_va, y_va, f_tr, y_tr, 3, k=10, t=0.1, chunk=16)
    lr = logreg_eval(f_tr, y_tr, f_va, y_va, 3, seed=0, chunk_rows=16)  # gradient sums all-reduced
    # the SGD search on this rank's cached rows: logreg's rank-ordered held-out split, scores all-reduced
    grid = dataclasses.replace(proto, lr_grid=(0.05, 0.5), wd_grid=(0.001, 0.1), features="cached")
    searched = sgd_probe(f_tr, y_tr, f_va, y_va, 3, grid, ctx)
    w = lin.head.fc.weight.detach()
    result = {
        "linear_top1": lin.top1,
        "linear_val_samples": lin.val_samples,
        "head_weight": w.flatten().tolist(),
        "knn_top1": knn.top1,
        "knn_top5": knn.top5,
        "knn_total": knn.total,
        "train_rows": int(f_tr.shape[0]),
        "logreg_top1": lr.top1,
        "logreg_top5": lr.top5,
        "logreg_val_samples": lr.val_samples,
        "logreg_l2": lr.l2,
        "logreg_search": [r["holdout_top1"] for r in lr.search],
        "sgd_search": [[lr_, wd, *score] for (lr_, wd), score in searched.search.items()],
        "sgd_chosen": [searched.lr, searched.weight_decay],
        "sgd_top1": searched.top1,
        "sgd_val_samples": searched.val_samples,
        "sgd_head_weight": searched.head.fc.weight.detach().flatten().tolist(),
        "logreg_weight": lr.head.weight.detach().flatten().tolist(),
    }
    distributed.teardown(ctx)
    # nothing holds the group past teardown: one still alive is freed at the interpreter's exit, where gloo
    # aborted a rank now and then (SIGABRT) after its work was done
    result["group_freed"] = world() is None
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
