"""Several shard sets read as one training set (``data.train: [a, b]``): coverage, ranks, resume."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from unmix.pipeline import build_eval_loader, build_pretrain_loader
from unmix.pipeline.loaders import shard_files
from unmix.pipeline.shards import write_shards
from unmix.pipeline.shards.sources import memory_source

CROP = 32
BATCH = 16


def _jpegs(n: int, seed: int) -> list[tuple[str, bytes, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (CROP, CROP, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append((f"{i:03d}.jpg", buf.getvalue(), i % 3))
    return out


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """A labelled set of 96 images (6 shards) and an unlabeled one of 64 (4 shards), as STL-10's
    train and unlabeled splits are."""
    root = tmp_path_factory.mktemp("union")
    a = write_shards(
        memory_source("a", _jpegs(96, 0), ["x", "y", "z"]),
        root / "a",
        split="train",
        samples_per_shard=16,
        workers=1,
        progress=False,
    )
    b = write_shards(
        memory_source("b", _jpegs(64, 1), ["x", "y", "z"]),
        root / "b",
        split="unlabeled",
        samples_per_shard=16,
        workers=1,
        progress=False,
        labeled=False,
    )
    assert a.labeled and not b.labeled
    keys = {f"0/{i:08d}" for i in range(96)} | {f"1/{i:08d}" for i in range(64)}
    return [root / "a", root / "b"], keys


def _loader(shards, **kw):
    args = dict(batch_size=BATCH, crop=CROP, unmix={"enabled": True}, device="cpu", num_threads=2, seed=0)
    args.update(kw)
    return build_pretrain_loader(shards, with_keys=True, **args)


def _take(loader, n):
    out = []
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_shards", [1, 2])
def test_every_sample_of_both_sets_once_per_epoch(two_sets, num_shards):
    shards, keys = two_sets
    loaders = [_loader(shards, shard_id=r, num_shards=num_shards) for r in range(num_shards)]
    for _epoch in range(2):
        seen = []
        for loader in loaders:
            assert len(loader) == (160 // num_shards) // BATCH  # the union's length
            part = [k for b in loader for k in b["key"]]
            assert {k.split("/")[0] for k in part} == {"0", "1"}, "each rank's part mixes both sets"
            seen += part
        assert sorted(seen) == sorted(keys), "every sample of both sets exactly once"


def test_sets_are_interleaved_not_concatenated(two_sets):
    files = shard_files(two_sets[0])
    assert files.total == 160 and not files.labeled and len(files.tars) == 10
    # tar i of n at (i + 0.5) / n: a at 1/12, 3/12, ...; b at 1/8, 3/8, ...
    assert files.tar_sets == (0, 1, 0, 1, 0, 0, 1, 0, 1, 0)
    first_half = files.tar_sets[:5]
    assert 0 in first_half and 1 in first_half


def test_resume_continues_exactly(two_sets):
    shards, _ = two_sets
    n = len(_loader(shards))  # 10 steps per epoch
    loader = _loader(shards)
    _take(loader, 3)
    state = loader.state_dict()
    expected = _take(loader, n - 3 + n)  # the rest of epoch 0 and all of epoch 1
    resumed = _loader(shards, state=state)
    got = _take(resumed, n - 3 + n)
    for x, y in zip(expected, got, strict=True):
        assert x["key"] == y["key"]
        for k in ("view1", "view2", "mixed", "lam"):
            assert torch.equal(x[k], y[k]), k
    with pytest.raises(ValueError, match="samples"):  # a state of other data is refused
        _loader(shards[:1], state=state)


def test_unlabeled_set_alone_pretrains_but_is_refused_for_evaluation(two_sets):
    (_, unlabeled), _ = two_sets
    batch = next(iter(_loader(unlabeled)))
    assert batch["view1"].shape == (BATCH, 3, CROP, CROP) and all(k.startswith("0") for k in batch["key"])
    for shards in (unlabeled, two_sets[0]):
        with pytest.raises(ValueError, match="without labels"):
            build_eval_loader(shards, 8, split="val", crop=CROP, device="cpu", num_threads=1)


def test_labelled_sets_evaluate_as_one(two_sets, tmp_path):
    a = two_sets[0][0]
    c = write_shards(
        memory_source("c", _jpegs(24, 2), ["x", "y", "z"]),
        tmp_path / "c",
        split="val",
        workers=1,
        progress=False,
    )
    seen = {}
    for b in build_eval_loader(
        [a, c.root], 10, split="val", crop=CROP, device="cpu", num_threads=1, with_keys=True
    ):
        for k, y in zip(b["key"], b["label"].tolist(), strict=True):
            assert k not in seen
            seen[k] = y
    want = {f"0/{i:08d}": i % 3 for i in range(96)} | {f"1/{i:08d}": i % 3 for i in range(24)}
    assert seen == want
    with pytest.raises(ValueError, match="listed twice"):
        shard_files([a, a / "manifest.json"])
    with pytest.raises(ValueError, match="empty"):
        shard_files([])
