"""``unmix bench probe``, registered by ``unmix.eval.cli``, run by ``unmix.eval.bench_probe``."""

from __future__ import annotations

import re

import pytest


def test_probe_samples_are_the_ones_with_a_crop() -> None:
    from unmix.eval.bench_probe import SAMPLES_CROP
    from unmix.eval.cli import PROBE_SAMPLES

    assert sorted(PROBE_SAMPLES) == sorted(SAMPLES_CROP)


def test_bench_probe_speed_runs_from_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The speed part on a tiny problem, timed on all its rows: "measured", not scaled."""
    from unmix.cli import main

    argv = ["bench", "probe", "--skip-accuracy", "--speed-rows", "64", "--target-rows", "64"]
    assert main([*argv, "--dim", "8", "--classes", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^logreg objective .* 64 x 8 features, 3 classes, cpu .*\(measured; median of 3: ", out, re.M
    )
    assert "projected grid + refit: 1,000 evaluations" in out


def test_bench_probe_refuses_a_gpu_it_does_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from unmix.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert main(["bench", "probe", "--skip-accuracy", "--skip-speed", "--device", "gpu"]) == 2
    assert (
        capsys.readouterr().err.strip() == "unmix bench probe: error: --device gpu: no CUDA device is visible"
    )


def _blobs(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    means = torch.randn(4, 16, generator=torch.Generator().manual_seed(0)) * 3
    y = torch.randint(0, 4, (n,), generator=g)
    return means[y] + 5.0 * torch.randn(n, 16, generator=g), y


def test_selection_rules_pick_as_documented() -> None:
    from unmix.eval.bench_probe import _gaps, pick

    def row(lr, wd, top1, loss, val):
        return {"lr": lr, "weight_decay": wd, "holdout_top1": top1, "holdout_loss": loss, "val": val}

    rows = [
        row(0.03, 0.001, 90.0, 0.30, 91.0),
        row(0.3, 0.001, 92.0, 0.35, 93.0),
        row(0.3, 0.1, 92.0, 0.20, 95.0),  # ties the top-1 above: the larger decay wins it
        row(1.0, 0.001, None, None, None),  # stopped by the guard
    ]
    assert pick(rows, "fixed", (0.3, 0.001))["val"] == 93.0
    assert pick(rows, "holdout top-1", (0.3, 0.001))["weight_decay"] == 0.1
    assert pick(rows, "holdout loss", (0.3, 0.001))["holdout_loss"] == 0.20
    assert pick(rows, "best on val", (0.3, 0.001))["val"] == 95.0
    with pytest.raises(ValueError, match="unknown rule"):
        pick(rows, "median", (0.3, 0.001))
    assert _gaps([-0.5, 0.25]) == "-0.12 (-0.50)" and _gaps([0.1, None]) == "stopped"


def test_pair_scores_are_the_searchs_own_fits() -> None:
    """The bench's per-pair scores are the search's: its held-out loss rule picks the pair sgd_probe's
    search picks, and each pair's val top-1 is that pair trained on all of train."""
    import dataclasses

    import torch

    from unmix.eval.bench_probe import pair_scores, pick
    from unmix.eval.linear import sgd_probe
    from unmix.eval.protocols import fixed, moco_protocol

    torch.set_num_threads(1)
    (f_tr, y_tr), (f_va, y_va) = _blobs(300, 1), _blobs(200, 2)
    proto = dataclasses.replace(
        moco_protocol(), epochs=4, batch_size=64, lr_grid=(0.01, 0.3), wd_grid=(0.0, 0.1)
    )
    rows = pair_scores(proto, f_tr, y_tr, f_va, y_va, 4)
    searched = sgd_probe(f_tr, y_tr, f_va, y_va, 4, proto)
    assert [(r["lr"], r["weight_decay"]) for r in rows] == list(searched.search)
    for r in rows:
        score = searched.search[r["lr"], r["weight_decay"]]
        assert (r["holdout_top1"], r["holdout_loss"]) == (score.top1, score.loss)
        p = fixed(proto, lr=r["lr"], weight_decay=r["weight_decay"])
        assert r["val"] == sgd_probe(f_tr, y_tr, f_va, y_va, 4, p).top1
    chosen = pick(rows, "holdout loss", (0.3, 0.0))
    assert (chosen["lr"], chosen["weight_decay"]) == (searched.lr, searched.weight_decay)
    assert chosen["val"] == searched.top1


def test_bench_probe_has_the_selection_study() -> None:
    from unmix.cli import build_parser

    args = build_parser().parse_args(["bench", "probe", "--selection", "--samples", "photos", "--seeds", "3"])
    assert args.selection and args.samples == ["photos"] and args.seeds == 3
