"""``unmix bench fidelity``: the reference arm's data and views, the summary, and a tiny end-to-end run."""

from __future__ import annotations

import io
import json
import math
import os
import statistics
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from unmix.eval.bench_fidelity import SeedCurves, format_table, read_shard_images, summarise
from unmix.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, RECIPES, ViewSpec
from unmix.pipeline.bench_pipeline import torchvision_view
from unmix.pipeline.shards import read_manifest


def test_read_shard_images_returns_every_sample_with_its_label(sample_val):
    images, labels = read_shard_images(sample_val)
    m = read_manifest(sample_val)
    assert len(images) == len(labels) == m.total
    # against the tar members themselves: the first shard's first sample (manifest order = tar order)
    with tarfile.open(m.shards[0].path) as tar:
        keys = [n.rpartition(".")[0] for n in tar.getnames() if n.endswith(".jpg")]
        jpg = tar.extractfile(keys[0] + ".jpg").read()
        cls = int(tar.extractfile(keys[0] + ".cls").read().decode())
    i = 0
    expected = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    np.testing.assert_array_equal(np.asarray(images[i]), expected)
    assert labels[i] == cls
    assert sorted(set(labels)) == list(range(m.num_classes))


def test_torchvision_view_follows_the_recipe():
    from torchvision import transforms as T

    t = torchvision_view(RECIPES["byol"].view2, 32)  # BYOL's view 2: blur p 0.1, solarize p 0.2
    kinds = [type(op).__name__ for op in t.transforms]
    assert kinds == [
        "RandomResizedCrop", "RandomApply", "RandomGrayscale", "RandomApply", "RandomSolarize",
        "RandomHorizontalFlip", "ToTensor", "Normalize",
    ]  # fmt: skip
    crop, jitter, gray, blur, solarize = t.transforms[:5]
    assert crop.scale == (0.08, 1.0) and crop.size == (32, 32)
    assert jitter.p == 0.8 and isinstance(jitter.transforms[0], T.ColorJitter)
    cj = jitter.transforms[0]
    assert (cj.brightness, cj.contrast, cj.saturation, cj.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.8, 1.2),
        (-0.1, 0.1),
    )
    assert gray.p == 0.2 and blur.p == 0.1 and solarize.p == 0.2
    assert blur.transforms[0].sigma == (0.1, 2.0)
    # a view without randomness: the whole image, resized and normalised with the pipeline's mean/std
    plain = torchvision_view(ViewSpec(scale=(1.0, 1.0), ratio=(1.0, 1.0)).without_randomness(), 8)
    img = Image.fromarray(np.full((8, 8, 3), (255, 128, 0), dtype=np.uint8))
    out = plain(img)
    want = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out[:, 0, 0], want.float())


def _curves(unmix: list[list[float]], ref: list[list[float]]) -> list[SeedCurves]:
    out = []
    for s, (u, r) in enumerate(zip(unmix, ref, strict=True)):
        c = SeedCurves(s)
        c.knn = {"unmix": u, "reference": r}
        out.append(c)
    return out


def test_seed_reference_fixes_the_blurred_views():
    """The reference's views repeat under a seed, whatever drew from the random streams before: BYOL's
    view 1 always blurs, with a sigma from Python's ``random`` (the authors' PIL blur)."""
    import random

    from unmix.eval.bench_fidelity import seed_reference

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    view = torchvision_view(RECIPES["byol"].view1, 32)
    seed_reference(3)
    first = view(img)
    random.random(), torch.rand(1)  # other draws in between, as an earlier method's seeds make
    seed_reference(3)
    assert torch.equal(view(img), first)


def test_summary_medians_ranges_and_paired_interval():
    u = [[50, 60], [50, 64], [50, 61]]
    r = [[50, 62], [50, 63], [50, 59]]
    s = summarise(_curves(u, r))
    last = s["rows"][1]
    assert last["unmix"]["median"] == 61 and (last["unmix"]["min"], last["unmix"]["max"]) == (60, 64)
    assert last["reference"]["median"] == 62
    diffs = [-2, 1, 2]
    half = 4.302652729911275 * statistics.stdev(diffs) / math.sqrt(3)  # t(0.975, 2)
    assert last["diff"]["mean"] == pytest.approx(statistics.fmean(diffs))
    assert last["diff"]["lo"] == pytest.approx(statistics.fmean(diffs) - half, rel=1e-6)
    assert s["agree"] is True and s["interval_holds_zero"] is True
    table = format_table(s, "t")
    assert "| init | 50.0 (50.0-50.0) | 50.0 (50.0-50.0) | 0 (same weights) |" in table
    assert "each arm's median lies inside the other's range" in table.splitlines()[-1]
    assert "holds 0 (within noise)" in table.splitlines()[-1]


def test_summary_disagrees_when_a_median_leaves_the_other_range():
    s = summarise(_curves([[50, 70], [50, 72], [50, 71]], [[50, 60], [50, 62], [50, 61]]))
    assert s["agree"] is False and s["interval_holds_zero"] is False
    last = format_table(s, "t").splitlines()[-1]
    assert "do NOT lie inside" in last and "+10.0 [" in last and "excludes 0" in last


def test_bench_fidelity_end_to_end_from_the_same_weights(sample_root, tmp_path):
    """Two seeds of a tiny MoCo v2 + Un-Mix: both arms start from the same weights (same kNN at init,
    per seed), both train their network by comparable amounts, and the table and JSON come out."""
    out = tmp_path / "fidelity.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable, "-m", "unmix", "bench", "fidelity", "--data", str(sample_root), "--seeds", "2",
        "--epochs", "1", "--json", str(out), "model.width=8", "data.crop=16", "optim.batch_size=64",
        "method.moco.K=256",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| init |" in proc.stdout and "last epoch, 2 seed(s):" in proc.stdout
    report = json.loads(out.read_text())["moco_v2"]
    curves = report["curves"]
    assert [c["seed"] for c in curves] == [0, 1]
    for c in curves:
        u, r = c["knn"]["unmix"], c["knn"]["reference"]
        assert len(u) == len(r) == 2
        assert u[0] == r[0]  # the same initial weights
        # both arms trained the network they were given, by steps of the same size (the same optimizer,
        # learning rate and step count: a wrong schedule or a frozen copy moves by another order)
        moved = c["moved"]
        assert moved["unmix"] > 1e-3 and moved["reference"] > 1e-3, moved
        assert 1 / 3 < moved["unmix"] / moved["reference"] < 3, moved
        assert all(math.isfinite(x) for x in c["losses"]["unmix"] + c["losses"]["reference"])
    assert curves[0]["knn"]["unmix"][0] != curves[1]["knn"]["unmix"][0]  # seeds differ at init


def test_bench_fidelity_refuses_a_data_root_without_shards(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "unmix", "bench", "fidelity", "--data", str(tmp_path), "--seeds", "1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert f"--data {tmp_path}: no train/manifest.json" in proc.stderr


def test_cli_offers_exactly_the_methods_with_a_setup():
    from unmix.eval.bench_fidelity import METHOD_OVERRIDES
    from unmix.eval.cli import FIDELITY_METHODS

    assert FIDELITY_METHODS == tuple(sorted(METHOD_OVERRIDES))
