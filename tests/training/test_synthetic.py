"""data.source=synthetic: the DALI loader's batches and interface, Un-Mix by the pipeline's rule
(checked against NumPy), deterministic by seed, resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from unmix.pipeline.torch_mixing import draw_mix, mix
from unmix.training.synthetic import SyntheticLoader


def _loader(**kw) -> SyntheticLoader:
    args = {"samples": 40, "unmix": True, "seed": 7}
    args.update(kw)
    return SyntheticLoader(4, 12, **args)


def _numpy_mode(x: np.ndarray, mixed: np.ndarray, lam: np.ndarray) -> str:
    """The NumPy reference: 'mixup' if mixed == lam x + (1 - lam) x[::-1] in float32, 'cutmix' if it is
    x with one rectangle (shared by the batch) copied from x[::-1] and lam == 1 - area / (H W)."""
    assert lam.dtype == np.float32 and np.all(lam == lam[0]), "one lambda per batch"
    partner = x[::-1]
    lam4 = lam[:, None, None, None]
    if np.array_equal(mixed, x * lam4 + partner * (np.float32(1) - lam4)):
        return "mixup"
    assert np.all((mixed == x) | (mixed == partner))
    from_partner = (mixed != x).any(axis=(0, 1))  # random floats: only pasted pixels differ
    ys, xs = np.nonzero(from_partner)
    box = np.zeros_like(from_partner)
    if len(ys):
        box[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] = True
    assert np.array_equal(box, from_partner), "the pasted pixels form one rectangle"
    assert np.array_equal(mixed[:, :, box], partner[:, :, box])
    assert lam[0] == np.float32(1 - box.sum() / box.size)
    return "cutmix"


def test_batches_shapes_dtypes_and_mixing_match_numpy():
    loader = _loader(samples=4 * 60)
    assert len(loader) == 60
    modes = set()
    for b in loader:
        assert set(b) == {"view1", "view2", "mixed", "lam"}
        assert b["view1"].shape == b["view2"].shape == b["mixed"].shape == (4, 3, 12, 12)
        assert b["view1"].dtype == torch.float32 and b["lam"].shape == (4,)
        modes.add(_numpy_mode(*(b[k].numpy() for k in ("view1", "mixed", "lam"))))
    assert modes == {"mixup", "cutmix"}
    plain = next(iter(_loader(unmix=False)))
    assert set(plain) == {"view1", "view2"}
    v1, v2 = plain["view1"], plain["view2"]
    assert (
        abs(float(v1.std()) - 1) < 0.2
        and 0.5 < float(torch.corrcoef(torch.stack([v1.flatten(), v2.flatten()]))[0, 1]) < 0.95
    )


def test_draws_follow_the_rule():
    rng = np.random.default_rng(0)
    draws = [draw_mix(rng, (16, 20), 0.5, 1.0) for _ in range(600)]
    mixup = [d.lam for d in draws if d.mode == "mixup"]
    assert 240 < len(mixup) < 360  # p_mixup 0.5
    assert stats.kstest(mixup, "uniform").pvalue > 1e-3  # Beta(1, 1)
    for d in draws:
        if d.mode == "cutmix":
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= 20 and 0 <= y1 < y2 <= 16  # never an empty box
            assert d.lam == np.float32(1 - (x2 - x1) * (y2 - y1) / 320)
    assert all(d.mode == "mixup" for d in (draw_mix(rng, (8, 8), 1.0, 1.0) for _ in range(20)))
    # lam near 1 (alpha 0.05, a 6x6 crop): 1-px sides instead of empty boxes, lam below 1 and exact
    x = torch.randn(4, 3, 6, 6)
    tiny = [d for d in (draw_mix(rng, (6, 6), 0.0, 0.05) for _ in range(200)) if d.lam > 0.9]
    assert len(tiny) > 20
    for d in tiny:
        x1, y1, x2, y2 = d.box
        assert x2 - x1 >= 1 and y2 - y1 >= 1 and d.lam < 1
        m, lam = mix(x, d)
        pasted = (m != x).any(dim=(0, 1))
        assert int(pasted.sum()) == (x2 - x1) * (y2 - y1) and float(lam[0]) == d.lam


def test_deterministic_by_seed_and_shard():
    a, b = list(_loader()), list(_loader())
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)
    c = next(iter(_loader(seed=8)))
    d = next(iter(_loader(shard_id=1, num_shards=2)))
    assert not torch.equal(a[0]["view1"], c["view1"]) and not torch.equal(a[0]["view1"], d["view1"])


def test_resume_continues_with_the_same_batches():
    straight = _loader()  # 10 batches per epoch
    seen = []
    for _ in range(2):
        seen += list(straight)
    first = _loader()
    it = iter(first)
    head = [next(it) for _ in range(3)]  # stop 3 batches into the first epoch
    state = first.state_dict()
    assert state["pos"] == 3 and state["epoch"] == 0
    resumed = _loader(state=state)
    rest = list(resumed) + list(resumed)
    got = head + rest
    assert len(got) == len(seen)
    assert all(torch.equal(x[k], y[k]) for x, y in zip(got, seen, strict=True) for k in x)
    assert resumed.state_dict()["epoch"] == 2
    with pytest.raises(ValueError, match="seed=7 but this loader has seed=9"):
        _loader(seed=9, state=state)


def test_channels_last_and_the_config_switch():
    b = next(iter(_loader(channels_last=True)))
    assert all(b[k].is_contiguous(memory_format=torch.channels_last) for k in ("view1", "view2"))
    from unmix.training.config import ConfigError, load_config
    from unmix.training.loop import build_loader

    cfg = load_config(
        None,
        [
            "data.source=synthetic",
            "data.device=cpu",
            "data.crop=16",
            "data.synthetic_samples=64",
            "unmix.enabled=true",
        ],
    )
    loader = build_loader(cfg, 8, 0, 1)
    assert isinstance(loader, SyntheticLoader) and len(loader) == 8
    assert next(iter(loader))["mixed"].shape == (8, 3, 16, 16)
    with pytest.raises(ConfigError, match="data.source"):
        load_config(None, ["data.source=files"])
