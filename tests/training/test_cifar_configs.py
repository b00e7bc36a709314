"""The paper's CIFAR configs load, resolve, and hold the authors' values (szq0214/Un-Mix unmix_c10.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmix.training.backbones import SMALL_IMAGE_MAX_CROP
from unmix.training.config import diff, flatten, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# unmix_c10.py / unmix_c100.py: argparse defaults + args.epochs = 1000, args.cos = True, args.symmetric = True
AUTHORS = {
    "model.arch": "resnet18",
    "data.crop": 32,
    "data.recipe": "moco_cifar",
    "method.name": "moco_v2",
    "method.moco.K": 4096,
    "method.moco.m": 0.99,
    "method.moco.T": 0.1,
    "method.moco.dim": 128,
    "method.moco.mlp": False,  # resnet18(num_classes=128): one Linear head
    "method.moco.symmetric": True,
    "optim.batch_size": 512,
    "optim.epochs": 1000,
    "optim.optimizer": "sgd",
    "optim.momentum": 0.9,
    "optim.weight_decay": 5e-4,
    "optim.schedule": "cosine",
    "optim.warmup_epochs": 0.0,
    "unmix.p_mixup": 0.5,
    "unmix.alpha": 1.0,
    "eval.knn_k": 200,
    "eval.knn_t": 0.1,
    "deepspeed.gradient_clipping": 0.0,
}


@pytest.mark.parametrize("n", ["10", "100"])
def test_cifar_pair(n: str):
    base = load_config(CONFIGS / f"cifar{n}_mocov2_sym.yaml")
    mixed = load_config(CONFIGS / f"cifar{n}_mocov2_sym_unmix.yaml")
    for cfg, enabled in ((base, False), (mixed, True)):
        flat = flatten(to_dict(cfg))
        assert {k: flat[k] for k in AUTHORS} == AUTHORS
        assert cfg.optim.lr * cfg.optim.batch_size / 256 == pytest.approx(0.06)  # --lr 0.06 at batch 512
        assert cfg.unmix.enabled is enabled and cfg.eval.knn_every_epochs > 0
        assert (cfg.data.train, cfg.data.val) == (f"shards/cifar{n}/train", f"shards/cifar{n}/val")
        assert cfg.mlflow.experiment == f"unmix-cifar{n}"
        assert cfg.model.small_images is None and cfg.data.crop <= SMALL_IMAGE_MAX_CROP  # the CIFAR stem
    # The pair differs only in Un-Mix (so `unmix compare` pairs them) and where it writes.
    changed = diff(to_dict(base), to_dict(mixed), ignore=("output_dir",))
    assert changed == ["unmix.enabled"]
