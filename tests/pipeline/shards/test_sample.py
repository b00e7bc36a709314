"""Built-in samples: digits (the test/demo data) and the ImageNet-like photo tree."""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unmix.pipeline.shards import read_manifest, verify_shards
from unmix.pipeline.shards.sample import load_digits_arrays, write_photo_tree, write_sample


def samples(m) -> list[tuple[str, bytes, int]]:
    import webdataset as wds

    return [(s["__key__"], s["jpg"], int(s["cls"])) for s in wds.WebDataset(m.tar_paths, shardshuffle=False)]


def test_digits_sample(sample_train: Path, sample_val: Path):
    tr, va = read_manifest(sample_train), read_manifest(sample_val)
    assert (tr.total, va.total) == (1438, 359) and tr.total + va.total == 1797
    assert tr.classes == va.classes == [str(i) for i in range(10)]
    assert (len(tr.shards), len(va.shards)) == (8, 4) and (tr.split, va.split) == ("train", "val")
    _, target = load_digits_arrays()
    per_class = Counter(target.tolist())
    val_counts = Counter(lab for _, _, lab in samples(va))
    for c in range(10):  # stratified: 20 % of every class in val
        assert val_counts[c] == round(per_class[c] * 0.2)
    key, jpg, _ = samples(tr)[0]
    img = Image.open(io.BytesIO(jpg))
    assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
    a = np.asarray(img, dtype=np.int16)
    assert a.std() > 20 and np.abs(a[..., 0] - a[..., 1]).max() <= 4  # a grey picture, not blank


def test_digits_arrays_are_the_uci_digits():
    images, target = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.min() == 0 and images.max() == 16
    # class sizes and first image of the UCI optdigits data that sklearn.datasets.load_digits returns
    assert np.bincount(target).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    assert images[0, 1].tolist() == [0, 0, 13, 15, 10, 15, 5, 0] and target[:10].tolist() == list(range(10))


@pytest.mark.slow  # importing scikit-learn takes seconds on a busy machine
def test_digits_images_match_sklearn():
    from sklearn.datasets import load_digits

    images, target = load_digits_arrays()
    d = load_digits()
    assert np.array_equal(images, d.images) and np.array_equal(target, d.target)


def test_sample_is_deterministic(sample_train: Path, tmp_path: Path):
    write_sample("digits", tmp_path)
    a, b = read_manifest(sample_train), read_manifest(tmp_path / "train")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert [hashlib.sha256(s.path.read_bytes()).hexdigest() for s in b.shards] == [s.sha256 for s in a.shards]
    write_sample("digits", tmp_path)  # same job again: recognised, nothing rewritten


def test_photos_sample_and_tree(tmp_path: Path):
    tr, va = write_sample("photos", tmp_path / "p", n_images=20, n_classes=4, samples_per_shard=8)
    assert (tr.total, va.total) == (16, 4) and tr.classes == va.classes == [f"class{c:03d}" for c in range(4)]
    assert verify_shards(tmp_path / "p" / "val") == []
    tree = write_photo_tree(tmp_path / "tree", 6, n_classes=3, seed=1)
    files = sorted(tree.rglob("*.JPEG"))
    assert [f.parent.name for f in files] == ["class000"] * 2 + ["class001"] * 2 + ["class002"] * 2
    img = Image.open(files[0])
    assert img.format == "JPEG" and img.size == (500, 375)
    assert 40_000 < np.mean([f.stat().st_size for f in files]) < 200_000  # photo-sized JPEGs
    again = write_photo_tree(tmp_path / "tree2", 6, n_classes=3, seed=1)
    assert [f.read_bytes() for f in sorted(again.rglob("*.JPEG"))] == [f.read_bytes() for f in files]


def test_unknown_sample(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown sample 'mnist'"):
        write_sample("mnist", tmp_path)


def test_shifted_digits_place_each_digit_inside_the_canvas_at_its_own_size(tmp_path: Path):
    from unmix.pipeline.cli import SAMPLE_NAMES
    from unmix.pipeline.shards.sample import SAMPLES, SHIFTED_SIZE, shifted_digit

    assert SAMPLE_NAMES == SAMPLES  # the CLI's choices (kept without importing this module)
    tr, va = write_sample("shifted-digits", tmp_path / "s")
    assert (tr.total, va.total) == (1438, 5 * 359) and tr.classes == [str(i) for i in range(10)]
    images, target = load_digits_arrays()
    per_class = Counter(target.tolist())
    assert Counter(lab for _, _, lab in samples(va)) == {c: 5 * round(n * 0.2) for c, n in per_class.items()}
    # a key is the index of its name in the sorted source (class/digit_IIII_R.jpg): keys 5j .. 5j+4 are
    # one val digit's five placements: one label, and mostly five different images (a place and size can
    # repeat: 6 sizes x at most 81 places)
    val = {int(k): (jpg, lab) for k, jpg, lab in samples(va)}
    assert sorted(val) == list(range(5 * 359))
    digits = [[val[5 * j + r] for r in range(5)] for j in range(359)]
    assert all(len({lab for _, lab in d}) == 1 for d in digits)
    assert sum(len({jpg for jpg, _ in d}) == 5 for d in digits) > 330  # 342 of 359
    for _, jpg, _ in samples(tr)[:50]:
        img = Image.open(io.BytesIO(jpg))
        assert img.size == (SHIFTED_SIZE, SHIFTED_SIZE) and img.mode == "RGB"
    # the placement, against a NumPy reference: a bicubic digit of side 8..13 in a black 16x16 canvas
    rng = np.random.default_rng(3)
    sides, corners = [], []
    for g8 in images[:200]:
        state = rng.bit_generator.state
        a = np.asarray(shifted_digit(g8, rng))[..., 0].astype(int)
        ref = np.random.default_rng()
        ref.bit_generator.state = state
        side = int(round(SHIFTED_SIZE * ref.uniform(0.5, 0.8)))
        x, y = ref.integers(0, SHIFTED_SIZE - side + 1, size=2)
        outside = np.ones_like(a, dtype=bool)
        outside[y : y + side, x : x + side] = False
        assert a[outside].max() == 0 and a[~outside].max() > 100  # black outside the digit's box
        sides.append(side)
        corners.append((x, y))
    assert min(sides) == 8 and max(sides) == 13 and len(set(corners)) > 30  # sizes and places vary
