"""Augmentation recipes: shapes, dtypes, normalisation, the coin flips, blur, solarize, plain crops."""

from __future__ import annotations

import dataclasses
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats

from unmix.pipeline import build_pretrain_loader
from unmix.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, RECIPES, Recipe, ViewSpec, blur_window
from unmix.pipeline.shards import read_manifest

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _pixels(v: torch.Tensor) -> torch.Tensor:
    """Normalised float NCHW -> 0..255 float."""
    return (v.float() * STD + MEAN) * 255


def _first(loader):
    for b in loader:
        return b


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    """64 small (64x48) colour photographs as shards: colour operations are visible on them."""
    from unmix.pipeline.shards import write_shards
    from unmix.pipeline.shards.sample import write_photo_tree

    root = tmp_path_factory.mktemp("small_photos")
    tree = write_photo_tree(root / "tree", 64, n_classes=4, size=(64, 48))
    write_shards(tree, root / "train", samples_per_shard=32, progress=False, workers=1)
    return root / "train"


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_shapes_dtypes_and_normalisation(small_photos, recipe):
    b = _first(build_pretrain_loader(small_photos, 16, recipe=recipe, crop=32, device="cpu", num_threads=2))
    assert set(b) == {"view1", "view2"}
    for k in ("view1", "view2"):
        v = b[k]
        assert v.shape == (16, 3, 32, 32) and v.dtype == torch.float32 and v.is_contiguous()
        px = _pixels(v)
        assert px.min() >= -0.01 and px.max() <= 255.01, "normalised with ImageNet mean/std"
        assert 20 < px.mean() < 235
    assert not torch.isclose(b["view1"], b["view2"]).all(dim=(1, 2, 3)).any(), "views of one image differ"


def test_paper_parameters():
    v2, b1, b2 = RECIPES["moco_v2"].view1, RECIPES["byol"].view1, RECIPES["byol"].view2
    assert (v2.scale, v2.jitter) == ((0.2, 1.0), (0.4, 0.4, 0.4, 0.1))
    assert (v2.p_jitter, v2.p_gray, v2.p_blur, v2.blur_sigma) == (0.8, 0.2, 0.5, (0.1, 2.0))
    assert (b1.p_blur, b1.p_solarize, b2.p_blur, b2.p_solarize) == (1.0, 0.0, 0.1, 0.2)
    assert b1.scale == (0.08, 1.0) and b1.jitter == (0.4, 0.4, 0.2, 0.1)
    v1 = RECIPES["moco_v1"].view1
    assert (v1.jitter, v1.p_jitter, v1.p_gray, v1.p_blur) == ((0.4,) * 4, 1.0, 0.2, 0.0)
    c = RECIPES["moco_cifar"].view1  # unmix_c10.py's train_transform (torchvision defaults where unset)
    assert (c.scale, c.ratio, c.jitter) == ((0.08, 1.0), (3 / 4, 4 / 3), (0.4, 0.4, 0.4, 0.1))
    assert (c.p_jitter, c.p_gray, c.p_blur, c.p_solarize, c.p_flip) == (0.8, 0.2, 0.0, 0.0, 0.5)
    assert blur_window(224) == 23 and blur_window(32) == 3 and blur_window(64) == 7


def _decoded_val_images(shards) -> np.ndarray:
    imgs = []
    for s in read_manifest(shards).shards:
        with tarfile.open(s.path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    imgs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
    return np.stack(imgs).astype(np.float32)  # N, H, W, 3


def _nearest_distance(views: torch.Tensor, refs: np.ndarray) -> np.ndarray:
    px = _pixels(views).permute(0, 2, 3, 1).numpy()  # B, H, W, 3
    d = np.abs(px[:, None] - refs[None]).max(axis=(2, 3, 4))  # B, N: max abs pixel difference
    return d.min(axis=1)


def test_all_probabilities_zero_gives_a_plain_resized_crop(sample_val):
    """The digits are 32x32: a crop of the whole image (scale 1, ratio 1) resized to 32 is the image."""
    refs = _decoded_val_images(sample_val)
    whole = dataclasses.replace(RECIPES["moco_v2"].view1, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = Recipe("plain", whole).without_randomness()
    b = _first(build_pretrain_loader(sample_val, 32, recipe=plain, crop=32, device="cpu", num_threads=2))
    for k in ("view1", "view2"):
        assert (_nearest_distance(b[k], refs) <= 1.01).all(), "each view is a decoded image, unchanged"
    # the same crop with the recipe's coin flips is (mostly) not an unchanged image
    b = _first(
        build_pretrain_loader(
            sample_val, 32, recipe=Recipe("whole", whole), crop=32, device="cpu", num_threads=2
        )
    )
    assert (_nearest_distance(b["view1"], refs) > 3).mean() > 0.5


def _spec(**kw) -> Recipe:
    base = ViewSpec(p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_flip=0.0)
    return Recipe("test", dataclasses.replace(base, **kw))


def _views(shards, recipe, n_batches=4, batch=32, crop=32, seed=0):
    loader = build_pretrain_loader(
        shards, batch, recipe=recipe, crop=crop, device="cpu", num_threads=2, seed=seed
    )
    out = []
    while len(out) < n_batches:
        for b in loader:
            out.append(b["view1"])
            if len(out) == n_batches:
                break
    return torch.cat(out)


def _is_gray(v: torch.Tensor) -> torch.Tensor:
    px = _pixels(v)
    rg = (px[:, 0] - px[:, 1]).abs().amax(dim=(1, 2))
    gb = (px[:, 1] - px[:, 2]).abs().amax(dim=(1, 2))
    return (rg < 1.01) & (gb < 1.01)


def test_grayscale_probability_and_exactness(small_photos):
    gray = _is_gray(_views(small_photos, _spec(p_gray=1.0), n_batches=1))
    assert gray.all(), "p_gray=1: every view has R = G = B"
    v = _views(small_photos, _spec(p_gray=0.3), n_batches=8)
    k, n = int(_is_gray(v).sum()), len(v)
    assert stats.binomtest(k, n, 0.3).pvalue > 1e-3
    assert not _is_gray(_views(small_photos, _spec(), n_batches=1)).any()


def test_jitter_probability(small_photos):
    """With a fixed crop (whole image, no flip), views with jitter off equal the plain view."""
    whole = dict(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    plain = _views(small_photos, _spec(**whole), n_batches=2)
    refs = _pixels(plain).permute(0, 2, 3, 1).numpy()
    for p in (0.0, 0.6):
        v = _views(small_photos, _spec(p_jitter=p, **whole), n_batches=8)
        changed = _nearest_distance(v, refs) > 2
        k, n = int(changed.sum()), len(v)
        if p == 0:
            assert k == 0
        else:
            # a drawn jitter can be nearly the identity: count only clear changes, allow a small deficit
            assert stats.binomtest(k, n, p).pvalue > 1e-3 or 0.5 * p * n < k <= p * n


def test_flip_probability(small_photos):
    whole = dict(scale=(1.0, 1.0), ratio=(4 / 3, 4 / 3))
    plain = _pixels(_views(small_photos, _spec(**whole), n_batches=2)).permute(0, 2, 3, 1).numpy()
    v = _views(small_photos, _spec(p_flip=0.5, **whole), n_batches=8)
    unflipped = _nearest_distance(v, plain) <= 1.01
    flipped = _nearest_distance(v.flip(3), plain) <= 1.01
    assert (unflipped ^ flipped).all()
    assert stats.binomtest(int(flipped.sum()), len(v), 0.5).pvalue > 1e-3


def _run_graph(fn_of_input, images: np.ndarray):
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=1, enable_conditionals=True)
    def pipe():
        x = fn.external_source(source=lambda: list(images), batch=True, layout="HWC", dtype=types.UINT8)
        return x, fn_of_input(x)

    p = pipe()
    p.build()
    x, y = p.run()
    return np.stack([np.asarray(t) for t in y])


def test_solarize_matches_pil():
    from PIL import ImageOps

    from unmix.pipeline.augment import solarize

    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(3, 8, 10, 3), dtype=np.uint8)
    out = _run_graph(solarize, imgs)
    ref = np.stack([np.asarray(ImageOps.solarize(Image.fromarray(i), 128)) for i in imgs])
    assert out.dtype == np.uint8 and np.array_equal(out, ref)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 1.3, 2.0])
def test_truncated_blur_equals_full_kernel(sigma):
    from nvidia.dali import fn

    from unmix.pipeline.augment import gaussian_blur

    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 256, size=(2, 40, 40, 3), dtype=np.uint8)  # noise: the hardest case
    ours = _run_graph(lambda x: gaussian_blur(x, (sigma, sigma), 224), imgs).astype(int)
    full = _run_graph(lambda x: fn.gaussian_blur(x, window_size=23, sigma=sigma), imgs).astype(int)
    assert np.abs(ours - full).max() <= 1
    if sigma >= 0.7:
        assert np.abs(ours - imgs.astype(int)).max() > 10, "the blur does something"


def _blur_reference(img: np.ndarray, sigma: float, window: int) -> np.ndarray:
    """Separable Gaussian in float64: ``window`` taps cut to 2*ceil(4*sigma)+1, reflect-101 borders."""
    taps = min(window, 2 * int(np.ceil(4 * sigma)) + 1)
    t = np.arange(taps) - taps // 2
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    r = taps // 2
    pad = np.pad(img.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="reflect")  # numpy: reflect-101
    h, wd = img.shape[:2]
    v = sum(w[i] * pad[i : i + h] for i in range(taps))
    return sum(w[i] * v[:, i : i + wd] for i in range(taps))


def test_per_sample_blur_matches_numpy_reference():
    """Each sample's own random sigma (returned by the graph) against a float64 NumPy blur."""
    from nvidia.dali import fn, pipeline_def, types

    from unmix.pipeline.augment import blur_with_sigma

    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, size=(6, 48, 40, 3), dtype=np.uint8)

    @pipeline_def(batch_size=len(imgs), num_threads=1, device_id=None, seed=3)
    def pipe():
        x = fn.external_source(source=lambda: list(imgs), batch=True, layout="HWC", dtype=types.UINT8)
        sigma = fn.random.uniform(range=[0.1, 2.0])
        return blur_with_sigma(x, sigma, 224), sigma

    p = pipe()
    p.build()
    out, sigmas = p.run()
    sigmas = [float(np.asarray(s)) for s in sigmas]
    assert max(sigmas) - min(sigmas) > 0.5  # the samples really have different kernels
    for img, o, sigma in zip(imgs, out, sigmas, strict=True):
        o = np.asarray(o)
        assert o.dtype == np.uint8 and o.shape == img.shape
        assert np.abs(o.astype(float) - _blur_reference(img, sigma, 23)).max() <= 1.01, sigma
