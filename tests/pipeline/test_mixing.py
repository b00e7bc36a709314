"""Un-Mix in the DALI graph against NumPy references (DESIGN.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from unmix.pipeline.mixing import UnmixConfig


def _mix_batches(cfg: UnmixConfig, n_batches: int, batch_size: int = 4, hw=(12, 16), seed: int = 3):
    """Run mixing.unmix on random float CHW inputs; yield (x, mixed, lam, partner) as NumPy arrays."""
    from nvidia.dali import fn, pipeline_def

    from unmix.pipeline import mixing

    @pipeline_def(enable_conditionals=True, batch_size=batch_size, num_threads=1, device_id=None, seed=seed)
    def pipe():
        x = fn.random.uniform(range=[-2.0, 2.0], shape=[3, *hw])
        mixed, lam, partner = mixing.unmix(x, batch_size, cfg, hw, "cpu")
        return (x, mixed, lam) + ((partner,) if partner is not None else ())

    p = pipe()
    p.build()
    for _ in range(n_batches):
        out = p.run()
        arrs = [o.as_array() for o in out]
        partner = arrs[3].reshape(-1) if len(arrs) > 3 else np.arange(batch_size)[::-1]
        yield arrs[0], arrs[1], arrs[2].reshape(-1), partner


def _classify(x, mixed, lam, partner):
    """'mixup' if mixed == lam x + (1-lam) x[partner] exactly (to float rounding), 'cutmix' if every
    pixel is x or its partner; else None."""
    xp = x[partner]
    lam4 = lam[:, None, None, None]
    if np.allclose(mixed, lam4 * x + (1 - lam4) * xp, atol=1e-6, rtol=0):
        return "mixup"
    if np.all((mixed == x) | (mixed == xp)):
        return "cutmix"
    return None


def _box(mask2d: np.ndarray):
    """The bounding box (y1, y2, x1, x2) of a boolean mask, or None if empty."""
    ys, xs = np.nonzero(mask2d)
    if len(ys) == 0:
        return None
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_global_and_region_batches_are_exact():
    seen = set()
    for x, mixed, lam, partner in _mix_batches(UnmixConfig(p_mixup=0.5), 40):
        assert np.all(lam == lam[0]), "one lambda per batch"
        mode = _classify(x, mixed, lam, partner)
        assert mode is not None
        seen.add(mode)
        if mode == "cutmix":
            pasted = mixed != x  # random floats: x == partner never happens
            first = pasted[0, 0]
            assert np.all(pasted == first[None, None]), "one box shared by all samples and channels"
            box = _box(first)
            area = 0 if box is None else (box[1] - box[0]) * (box[3] - box[2])
            if box is not None:
                assert first[box[0] : box[1], box[2] : box[3]].all(), "the pasted region is one rectangle"
            assert lam[0] == pytest.approx(1 - area / first.size, abs=1e-6)
    assert seen == {"mixup", "cutmix"}


def test_cutmix_box_follows_the_authors_rand_bbox():
    """Box side floor(sqrt(1-lam0) W) with a uniform centre: over many batches the mean pasted area
    fraction is E[1-lam0] (Beta(1,1): 1/2) minus the clipping loss; each box is at most that side."""
    H, W = 12, 16
    fractions = []
    for x, mixed, lam, _ in _mix_batches(UnmixConfig(p_mixup=0.0), 200, hw=(H, W)):
        pasted = (mixed != x)[0, 0]
        box = _box(pasted)
        if box is not None:
            assert box[1] - box[0] <= H and box[3] - box[2] <= W
        fractions.append(pasted.mean())
        assert 1 - lam[0] == pytest.approx(pasted.mean(), abs=1e-6)
    # centre uniform and clipping: E[area] is below 1/2 but well above 1/4
    assert 0.2 < np.mean(fractions) < 0.5


def test_modes_occur_with_configured_frequency():
    p = 0.3
    # no CutMix box is empty, so no CutMix batch looks like mixup with lam = 1
    modes = [_classify(*b) for b in _mix_batches(UnmixConfig(p_mixup=p), 400, batch_size=2, hw=(16, 16))]
    assert None not in modes
    k, n = sum(m == "mixup" for m in modes), len(modes)
    assert stats.binomtest(k, n, p).pvalue > 1e-3


def _reference_box(lam0: float, cx: int, cy: int, H: int, W: int, dtype=np.float64):
    """NumPy transcription of the authors' rand_bbox plus the never-empty rule (a half side of 0 -> 1 px),
    in ``dtype`` (the DALI graph computes in float32, the torch mixing in float64)."""
    cut = np.sqrt(dtype(1.0) - dtype(lam0))
    half_w, half_h = int(np.floor(np.floor(dtype(W) * cut) / 2)), int(np.floor(np.floor(dtype(H) * cut) / 2))
    x1, x2 = np.clip(cx - half_w, 0, W), np.clip(cx + max(half_w, 1), 0, W)
    y1, y2 = np.clip(cy - half_h, 0, H), np.clip(cy + max(half_h, 1), 0, H)
    return int(x1), int(y1), int(x2), int(y2), 1.0 - (x2 - x1) * (y2 - y1) / (H * W)


def _box_cases(n: int = 64):
    """(lam0, cx, cy, H, W): small crops and lam near 1 (empty boxes under the plain rule), edges, lam 0/1."""
    rng = np.random.default_rng(5)
    cases = []
    for H, W in [(1, 1), (2, 2), (3, 5), (7, 4), (16, 16), (224, 224)]:
        near_one = 1 - rng.uniform(0, 4 / (H * W), n // 2)
        lams = np.concatenate([[0.0, 1.0], rng.beta(0.05, 0.05, n // 2), near_one])
        for lam0 in np.clip(lams.astype(np.float32), 0, 1):
            cases.append((float(lam0), int(rng.integers(W)), int(rng.integers(H)), H, W))
            cases.append((float(lam0), W - 1, 0, H, W))  # the corners: clipping
    return cases


def test_cutmix_box_is_never_empty_and_matches_the_reference_in_both_implementations():
    """The DALI graph's box (run through the CPU operators on the same inputs) and the torch mixing's
    box both equal the NumPy reference, and no box is empty; lam is recomputed from the box."""
    from nvidia.dali import fn, pipeline_def, types

    from unmix.pipeline import mixing
    from unmix.pipeline.torch_mixing import cutmix_box

    cases = _box_cases()
    plain_empty = 0
    by_size: dict[tuple[int, int], list] = {}
    for c in cases:
        by_size.setdefault(c[3:], []).append(c)
        lam0, cx, cy, H, W = c
        ref = _reference_box(lam0, cx, cy, H, W)
        assert ref[2] > ref[0] and ref[3] > ref[1], c
        assert cutmix_box(lam0, cx, cy, (H, W))[:4] == ref[:4], c
        assert cutmix_box(lam0, cx, cy, (H, W))[4] == pytest.approx(ref[4], abs=1e-12)
        plain_empty += np.floor(np.floor(min(H, W) * np.sqrt(1 - lam0)) / 2) == 0
    assert plain_empty > len(cases) // 3  # the cases do exercise what was an empty box

    for (H, W), group in by_size.items():
        cols = [np.array([g[i] for g in group], dtype=np.float32) for i in range(3)]

        @pipeline_def(batch_size=len(group), num_threads=1, device_id=None)
        def pipe(cols, size):
            lam, cx, cy = (fn.external_source(source=[c.reshape(-1, 1)], dtype=types.FLOAT) for c in cols)
            box = mixing.cutmix_box(lam, cx, cy, size)
            return tuple(fn.cast(v, dtype=types.FLOAT) for v in box)

        p = pipe(cols, (H, W))
        p.build()
        got = np.stack([o.as_array().reshape(-1) for o in p.run()], axis=1)  # N x 5
        for row, c in zip(got, group, strict=True):
            ref = _reference_box(*c, dtype=np.float32)
            assert tuple(int(v) for v in row[:4]) == ref[:4], (c, row)
            assert row[4] == pytest.approx(ref[4], abs=1e-6), (c, row)


@pytest.mark.parametrize("hw", [(4, 4), (6, 9), (16, 16)])
@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_graph_pastes_a_nonempty_box_at_small_crops_and_alphas(hw, alpha):
    """The whole graph (CPU operators): every CutMix batch pastes at least one pixel, one rectangle,
    and lam equals the unpasted fraction (lam < 1 always)."""
    for x, mixed, lam, _ in _mix_batches(UnmixConfig(p_mixup=0.0, alpha=alpha), 40, hw=hw, seed=11):
        pasted = (mixed != x)[0, 0]
        box = _box(pasted)
        assert box is not None, "an empty CutMix box"
        assert pasted[box[0] : box[1], box[2] : box[3]].all()
        assert lam[0] < 1 and lam[0] == pytest.approx(1 - pasted.mean(), abs=1e-6)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_lambda_follows_beta(alpha):
    cfg = UnmixConfig(p_mixup=1.0, alpha=alpha)
    lams = [b[2][0] for b in _mix_batches(cfg, 300, batch_size=2, hw=(2, 2))]
    assert stats.kstest(lams, stats.beta(alpha, alpha).cdf).pvalue > 1e-3
    # and not the other alpha's distribution (the test can fail)
    other = 4.0
    assert stats.kstest(lams, stats.beta(other, other).cdf).pvalue < 1e-3


def test_per_sample_lambda_option():
    for x, mixed, lam, partner in _mix_batches(UnmixConfig(p_mixup=1.0, per_sample_lambda=True), 5):
        assert len(set(lam.tolist())) == len(lam)
        assert _classify(x, mixed, lam, partner) == "mixup"


def test_random_partner_option():
    for x, mixed, lam, partner in _mix_batches(UnmixConfig(random_partner=True), 10, batch_size=6):
        assert sorted(partner.tolist()) == list(range(6))
        assert np.all(partner != np.arange(6)), "no sample is its own partner"
        assert _classify(x, mixed, lam, partner) is not None


def test_config_resolution_and_errors():
    assert UnmixConfig.resolve(None).enabled is False
    assert UnmixConfig.resolve(False).enabled is False
    assert UnmixConfig.resolve({"p_mixup": 0.2}) == UnmixConfig(p_mixup=0.2)
    with pytest.raises(ValueError, match="bogus"):
        UnmixConfig.resolve({"bogus": 1})
    with pytest.raises(ValueError, match="p_mixup"):
        UnmixConfig(p_mixup=1.5)


def _loader_batches(shards, unmix, n, **kw):
    from unmix.pipeline import build_pretrain_loader

    loader = build_pretrain_loader(
        shards,
        8,
        crop=32,
        unmix=unmix,
        device=kw.pop("device", "cpu"),
        num_threads=2,
        seed=kw.pop("seed", 0),
        **kw,
    )
    out = []
    for i, b in enumerate(loader):
        if i == n:
            break
        out.append(b)
    return out


def _check_loader_mixing(batches):
    modes = set()
    for b in batches:
        v1, mixed, lam = (b[k].float().cpu() for k in ("view1", "mixed", "lam"))
        assert lam.shape == (v1.shape[0],) and lam.dtype == torch.float32
        assert torch.all(lam == lam[0])
        partner = v1.flip(0)
        if torch.allclose(
            mixed, lam[:, None, None, None] * v1 + (1 - lam[:, None, None, None]) * partner, atol=1e-5, rtol=0
        ):
            modes.add("mixup")
            continue
        assert torch.all((mixed == v1) | (mixed == partner)), "region mix: each pixel original or partner"
        modes.add("cutmix")
        # pixels that can only come from the partner span one rectangle shared by the batch
        surely = ((mixed == partner) & (mixed != v1)).any(dim=(0, 1)).numpy()
        box = _box(surely)
        assert box is not None
        H, W = surely.shape
        inside = np.zeros_like(surely)
        inside[box[0] : box[1], box[2] : box[3]] = True
        not_pasted = ((mixed == v1) & (mixed != partner)).any(dim=(0, 1)).numpy()
        assert not (not_pasted & inside).any(), "an unpasted pixel inside the pasted rectangle"
        # lam == 1 - box_area/area (the box may be a bit larger than the provably pasted pixels)
        assert float(lam[0]) <= 1 - inside.sum() / (H * W) + 1e-6
        assert float(lam[0]) >= 1 - 1.3 * inside.sum() / (H * W) - 2 * (H + W) / (H * W)
    return modes


def test_loader_mixture_matches_reference(sample_train):
    batches = _loader_batches(sample_train, {"p_mixup": 0.5}, 24)
    assert _check_loader_mixing(batches) == {"mixup", "cutmix"}


def test_unmix_disabled_returns_only_views(sample_train):
    for unmix in (None, {"enabled": False}):
        (b,) = _loader_batches(sample_train, unmix, 1)
        assert set(b) == {"view1", "view2"}


@pytest.mark.gpu
def test_loader_mixture_matches_reference_gpu(sample_train):
    batches = _loader_batches(sample_train, {"p_mixup": 0.5}, 24, device="gpu")
    assert batches[0]["view1"].is_cuda and batches[0]["lam"].is_cuda
    assert _check_loader_mixing(batches) == {"mixup", "cutmix"}
