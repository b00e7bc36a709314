"""The STL-10, Tiny ImageNet and ImageNet-100 configs load, resolve, pair up (Un-Mix off/on differing only in
unmix.enabled), hold their sources' values, and name every value's source in the header."""

from __future__ import annotations

from pathlib import Path

import pytest

from unmix.training.backbones import SMALL_IMAGE_MAX_CROP
from unmix.training.config import diff, flatten, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The authors' CIFAR recipe (szq0214/Un-Mix unmix_c10.py; see test_cifar_configs.py), shared by every
# small-image config whatever the method.
CIFAR_RECIPE = {
    "model.arch": "resnet18",
    "data.recipe": "moco_cifar",
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
CIFAR_MOCO = {
    "method.name": "moco_v2",
    "method.moco.K": 4096,
    "method.moco.m": 0.99,
    "method.moco.T": 0.1,
    "method.moco.dim": 128,
    "method.moco.mlp": False,
    "method.moco.symmetric": True,
}
BYOL_PAPER = {
    "method.name": "byol",
    "method.byol.proj_hidden_dim": 4096,
    "method.byol.proj_dim": 256,
    "method.byol.pred_hidden_dim": 4096,
    "method.byol.tau_base": 0.996,
}
# UnMix_MoCo/for_ImageNet/run.sh: --lr 0.03 --batch-size 256 --unmix_prob 0.5 --mlp --moco-t 0.20
# --aug-plus --cos
IMAGENET_MOCO = {
    "model.arch": "resnet50",
    "data.crop": 224,
    "data.recipe": "moco_v2",
    "method.name": "moco_v2",
    "method.moco.K": 65536,
    "method.moco.m": 0.999,
    "method.moco.T": 0.2,
    "method.moco.mlp": True,
    "method.moco.hidden_dim": 2048,
    "method.moco.symmetric": False,
    "optim.batch_size": 256,
    "optim.lr": 0.03,
    "optim.epochs": 200,
    "optim.weight_decay": 1e-4,
    "optim.schedule": "cosine",
    "unmix.p_mixup": 0.5,
    "unmix.alpha": 1.0,
}

SMALL = {  # name: (crop, data.train, data.val)
    "stl10": (96, ["shards/stl10/train", "shards/stl10/unlabeled"], "shards/stl10/val"),
    "tinyimagenet": (64, "shards/tinyimagenet/train", "shards/tinyimagenet/val"),
}
PAIRS = [f"{n}_{m}" for n in SMALL for m in ("mocov2_sym", "byol")] + [
    "imagenet100_mocov2",
    "imagenet100_byol",
]


def _pair(stem: str):
    return load_config(CONFIGS / f"{stem}.yaml"), load_config(CONFIGS / f"{stem}_unmix.yaml")


@pytest.mark.parametrize("stem", PAIRS)
def test_pairs_differ_only_in_unmix(stem):
    base, mixed = _pair(stem)
    assert base.unmix.enabled is False and mixed.unmix.enabled is True
    assert diff(to_dict(base), to_dict(mixed), ignore=("output_dir",)) == ["unmix.enabled"]
    assert base.output_dir == f"runs/{stem}" and mixed.output_dir == f"runs/{stem}_unmix"
    assert base.eval.knn_every_epochs > 0 and base.data.val


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", ["mocov2_sym", "byol"])
def test_small_images_use_the_authors_cifar_recipe_at_native_resolution(name, method):
    crop, train, val = SMALL[name]
    for cfg in _pair(f"{name}_{method}"):
        flat = flatten(to_dict(cfg))
        assert {k: flat[k] for k in CIFAR_RECIPE} == CIFAR_RECIPE
        want = CIFAR_MOCO if method == "mocov2_sym" else BYOL_PAPER
        assert {k: flat[k] for k in want} == want
        assert cfg.optim.lr * cfg.optim.batch_size / 256 == pytest.approx(0.06)  # --lr 0.06 at batch 512
        assert (cfg.data.crop, cfg.data.train, cfg.data.val) == (crop, train, val)
        assert cfg.model.small_images is None  # the stem follows the crop: CIFAR stem at 64, ImageNet at 96
        assert (cfg.data.crop <= SMALL_IMAGE_MAX_CROP) == (name == "tinyimagenet")


def test_imagenet100_follows_the_authors_imagenet_recipe():
    for cfg in _pair("imagenet100_mocov2"):
        flat = flatten(to_dict(cfg))
        assert {k: flat[k] for k in IMAGENET_MOCO} == IMAGENET_MOCO
    imagenet_byol = flatten(to_dict(load_config(CONFIGS / "imagenet_byol_unmix.yaml")))
    for cfg in _pair("imagenet100_byol"):
        flat = flatten(to_dict(cfg))
        assert {k: flat[k] for k in BYOL_PAPER} == BYOL_PAPER
        same = [
            k for k in imagenet_byol if k.startswith(("optim.", "method.", "model.", "unmix.p", "unmix.a"))
        ]
        assert {k: flat[k] for k in same} == {k: imagenet_byol[k] for k in same}  # ImageNet-1K's BYOL values
    for cfg in (*_pair("imagenet100_mocov2"), *_pair("imagenet100_byol")):
        assert (cfg.data.train, cfg.data.val) == ("shards/imagenet100/train", "shards/imagenet100/val")


@pytest.mark.parametrize("stem", PAIRS)
def test_headers_name_sources_and_say_what_is_unverified(stem):
    for path in (CONFIGS / f"{stem}.yaml", CONFIGS / f"{stem}_unmix.yaml"):
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert "szq0214/Un-Mix" in header or "imagenet_byol" in header, path
        assert "0911f77dc0440df70111a92874ff0e7e7f36ec7f" in header or "Grill et al. 2020" in header, path
        if stem.startswith(("stl10", "tinyimagenet")):
            assert "not verified" in header, path  # the paper's numbers for these sets
        else:
            assert "no ImageNet-100 result" in header, path
        for key in (
            "optim.",
            "method.",
            "unmix.p_mixup",
            "data.crop" if "imagenet100" not in stem else "data.recipe",
        ):
            assert key in header, (path, key)
