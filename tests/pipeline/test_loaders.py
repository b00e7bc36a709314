"""Loader wiring: sharding, epoch lengths, labels, tensor ownership, determinism, checkpoint/resume."""

from __future__ import annotations

import itertools
import tarfile

import pytest
import torch

from unmix.pipeline import build_eval_loader, build_pretrain_loader
from unmix.pipeline.loaders import parse_labels
from unmix.pipeline.shards import read_manifest

CROP = 32


def _labels_in_shards(shards) -> dict[str, int]:
    """key -> label, read straight from the tars."""
    out = {}
    for s in read_manifest(shards).shards:
        with tarfile.open(s.path) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".cls"):
                    out[m.name[: -len(".cls")]] = int(tf.extractfile(m).read().decode())
    return out


def _pretrain(shards, **kw):
    args = dict(batch_size=32, crop=CROP, unmix={"enabled": True}, device="cpu", num_threads=2, seed=0)
    args.update(kw)
    return build_pretrain_loader(shards, **args)


def _take(loader, n):
    """The next n batches, continuing into following epochs if needed."""
    out = []
    while len(out) < n:
        for b in loader:
            out.append(b)
            if len(out) == n:
                break
    return out


@pytest.mark.parametrize("num_shards", [1, 3])
def test_pretrain_epochs_cover_each_rank_part_without_duplicates(sample_train, num_shards):
    total = read_manifest(sample_train).total
    keys_all = set(_labels_in_shards(sample_train))
    loaders = [
        _pretrain(sample_train, shard_id=r, num_shards=num_shards, with_keys=True, unmix=None)
        for r in range(num_shards)
    ]
    for epoch in range(2 if num_shards > 1 else 1):
        seen = []
        for loader in loaders:
            assert len(loader) == (total // num_shards) // 32
            n = 0
            for b in loader:
                assert b["view1"].shape == (32, 3, CROP, CROP) and len(b["key"]) == 32
                seen += b["key"]
                n += 1
            assert n == len(loader), f"epoch {epoch}: {n} steps but len() = {len(loader)}"
        assert len(seen) == len(set(seen)), "a sample was seen twice in one epoch"
        assert set(seen) <= keys_all
        assert len(seen) == num_shards * len(loaders[0]) * 32


@pytest.mark.parametrize("split,num_shards", [("val", 1), ("val", 3), ("train", 2)])
def test_eval_covers_every_sample_once_with_its_label(sample_train, sample_val, split, num_shards):
    shards = sample_val if split == "val" else sample_train
    truth = _labels_in_shards(shards)
    seen = {}
    for r in range(num_shards):
        loader = build_eval_loader(
            shards,
            64,
            split=split,
            crop=CROP,
            device="cpu",
            shard_id=r,
            num_shards=num_shards,
            num_threads=2,
            with_keys=True,
        )
        steps = 0
        for b in loader:
            assert b["image"].shape[1:] == (3, CROP, CROP) and b["label"].dtype == torch.int64
            for k, y in zip(b["key"], b["label"].tolist(), strict=True):
                assert k not in seen, f"{k} seen twice"
                seen[k] = y
            steps += 1
        assert steps == len(loader)
    assert seen == truth, "every sample exactly once, each with the label stored in its .cls"


def test_val_order_is_shard_order(sample_val):
    m = read_manifest(sample_val)
    order = []
    for s in m.shards:
        with tarfile.open(s.path) as tf:
            order += [n[:-4] for n in tf.getnames() if n.endswith(".jpg")]
    keys = []
    for b in build_eval_loader(
        sample_val, 100, split="val", crop=CROP, device="cpu", num_threads=2, with_keys=True
    ):
        keys += b["key"]
    assert keys == order


def test_parse_labels_vectorised():
    raw = torch.tensor([[55, 0, 0], [49, 50, 51], [57, 10, 0]], dtype=torch.uint8)  # "7", "123", "9\n"
    assert parse_labels(raw).tolist() == [7, 123, 9]
    with pytest.raises(ValueError, match="cls"):
        parse_labels(torch.zeros(2, 2, dtype=torch.uint8))


def test_yielded_tensors_are_not_overwritten_by_later_batches(sample_train):
    loader = _pretrain(sample_train, batch_size=16)
    it = iter(loader)
    first = next(it)
    kept = {k: v.clone() for k, v in first.items()}
    for _ in range(6):
        next(it)
    for k in kept:
        assert torch.equal(first[k], kept[k]), f"{k} changed after later batches"


def test_determinism_per_seed_and_rank(sample_train):
    a = _take(_pretrain(sample_train, num_shards=2, shard_id=0), 2)
    b = _take(_pretrain(sample_train, num_shards=2, shard_id=0), 2)
    c = _take(_pretrain(sample_train, num_shards=2, shard_id=1), 2)
    d = _take(_pretrain(sample_train, num_shards=2, shard_id=0, seed=1), 2)
    for x, y in zip(a, b, strict=True):
        for k in x:
            assert torch.equal(x[k], y[k]), k
    assert not torch.equal(a[0]["view1"], c[0]["view1"]), "ranks must differ"
    assert not torch.equal(a[0]["view1"], d[0]["view1"]), "seeds must differ"


def test_epochs_differ(sample_val):
    loader = _pretrain(sample_val, batch_size=64, with_keys=True)
    e1 = [b["key"] for b in loader]
    e2 = [b["key"] for b in loader]
    assert len(e1) == len(e2) == 360 // 64
    assert e1 != e2


def test_resume_from_state_dict_continues_exactly(sample_val):
    n = len(_pretrain(sample_val, batch_size=64))  # 5 steps per epoch
    loader = _pretrain(sample_val, batch_size=64, with_keys=True)
    _take(loader, 3)
    state = loader.state_dict()
    expected = _take(loader, 2 + n)  # the rest of epoch 0 and all of epoch 1
    resumed = _pretrain(sample_val, batch_size=64, with_keys=True, state=state)
    assert resumed.epoch == 0
    got = _take(resumed, 2 + n)
    for x, y in zip(expected, got, strict=True):
        assert x["key"] == y["key"]
        for k in ("view1", "view2", "mixed", "lam"):
            assert torch.equal(x[k], y[k]), k
    with pytest.raises(ValueError, match="shard_id"):
        _pretrain(sample_val, batch_size=64, state={**state, "shard_id": 1})


def test_env_defaults_and_dtype(sample_val, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = _pretrain(sample_val, batch_size=16, dtype=torch.bfloat16)
    assert loader.state_dict()["shard_id"] == 1 and len(loader) == 180 // 16
    b = next(iter(loader))
    assert b["view1"].dtype == b["mixed"].dtype == torch.bfloat16 and b["lam"].dtype == torch.float32


def test_errors_name_the_culprit(sample_val, tmp_path):
    with pytest.raises(ValueError, match="batch_size=512"):
        _pretrain(sample_val, batch_size=512)
    with pytest.raises(ValueError, match="device"):
        _pretrain(sample_val, device="tpu")
    with pytest.raises(ValueError, match="shard_id"):
        _pretrain(sample_val, shard_id=2, num_shards=2)
    with pytest.raises(Exception, match="manifest"):
        _pretrain(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cpu'"):
            _pretrain(sample_val, device="gpu")


@pytest.mark.gpu
def test_gpu_loaders_cover_and_stay_on_device(sample_val):
    seen = []
    for b in build_eval_loader(sample_val, 64, split="val", crop=CROP, device="gpu", with_keys=True):
        assert b["image"].is_cuda and b["label"].is_cuda
        seen += b["key"]
    assert sorted(seen) == sorted(_labels_in_shards(sample_val))
    (b,) = list(itertools.islice(iter(_pretrain(sample_val, device="gpu")), 1))
    assert all(b[k].is_cuda for k in ("view1", "view2", "mixed", "lam"))


def _channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


@pytest.mark.parametrize(
    "unmix",
    [{"p_mixup": 0.0}, {"p_mixup": 0.0, "per_sample_lambda": True}, {"p_mixup": 1.0, "random_partner": True}],
)
def test_channels_last_output_same_values_channels_last_strides(sample_val, unmix):
    # p_mixup 0: every batch CutMix (the HWC paste; one box, or a box per sample); 1: every batch mixup
    nchw = _take(_pretrain(sample_val, batch_size=16, unmix=unmix), 2)
    nhwc = _take(_pretrain(sample_val, batch_size=16, unmix=unmix, channels_last=True), 2)
    for a, b in zip(nchw, nhwc, strict=True):
        assert set(a) == set(b)
        for k in ("view1", "view2", "mixed"):
            assert b[k].shape == a[k].shape == (16, 3, CROP, CROP) and _channels_last(b[k]), k
            assert torch.equal(a[k], b[k]), k
        for k in set(a) - {"view1", "view2", "mixed"}:
            assert torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype and b[k].device.type == "cpu", k
    (b,) = _take(_pretrain(sample_val, batch_size=16, channels_last=True, dtype=torch.bfloat16), 1)
    assert b["mixed"].dtype == torch.bfloat16 and _channels_last(b["mixed"])


@pytest.mark.parametrize("split", ["train", "val"])
def test_eval_channels_last(sample_val, split):
    args = dict(split=split, crop=CROP, device="cpu", num_threads=2)
    a = next(iter(build_eval_loader(sample_val, 32, **args)))
    b = next(iter(build_eval_loader(sample_val, 32, channels_last=True, **args)))
    assert _channels_last(b["image"]) and torch.equal(a["image"], b["image"])
    assert torch.equal(a["label"], b["label"])


@pytest.mark.gpu
def test_gpu_per_sample_outputs_and_channels_last(sample_val):
    """lam / partner / labels reach the GPU (copied asynchronously from pinned memory) with the CPU's
    values, and channels_last output stays channels_last on the device."""
    unmix = {"random_partner": True, "per_sample_lambda": True}
    gpu = _take(_pretrain(sample_val, device="gpu", unmix=unmix, channels_last=True), 3)
    for b in gpu:
        assert all(b[k].is_cuda for k in ("view1", "mixed", "lam", "partner"))
        assert b["lam"].dtype == torch.float32 and b["partner"].dtype == torch.int64
        assert _channels_last(b["view1"]) and _channels_last(b["mixed"])
        lam, partner = b["lam"].cpu(), b["partner"].cpu()  # synchronises with the copies
        assert lam.shape == partner.shape == (32,) and bool(((lam >= 0) & (lam <= 1)).all())
        assert sorted(partner.tolist()) == list(range(32)) and bool((partner != torch.arange(32)).all())
    b = next(
        iter(build_eval_loader(sample_val, 64, split="val", crop=CROP, device="gpu", channels_last=True))
    )
    assert b["label"].is_cuda and _channels_last(b["image"])


def test_small_image_val_view_is_the_image_itself(sample_val):
    """At crop <= 64 the val transform takes a crop-sized image as is (CIFAR's evaluation): the loader's
    output is the shard's decoded JPEG, normalised, with no resize-and-crop margin."""
    import io

    import numpy as np
    from PIL import Image

    from unmix.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, val_resize

    assert val_resize(32) == 32 and val_resize(224) == 256
    m = read_manifest(sample_val)
    with tarfile.open(m.shards[0].path) as tf:
        first = next(n for n in tf.getnames() if n.endswith(".jpg"))
        img = np.asarray(Image.open(io.BytesIO(tf.extractfile(first).read())).convert("RGB"), np.float32)
    assert img.shape[:2] == (CROP, CROP)  # the digits sample is stored at 32x32
    batch = next(iter(build_eval_loader(sample_val, 8, split="val", crop=CROP, device="cpu", num_threads=1)))
    ref = (img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    got = batch["image"][0].permute(1, 2, 0).numpy()
    # PIL's and DALI's (libjpeg-turbo) decoders may differ by a grey level; a resampled image differs far more
    assert np.abs(got - ref).max() < 2.5 / 255 / min(IMAGENET_STD)
