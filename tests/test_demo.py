"""`unmix demo`, shortened (1 pretraining epoch, a narrow backbone), end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "unmix",
            "demo",
            "--workdir",
            str(workdir),
            "--device",
            "cpu",
            "optim.epochs=1",
            "model.width=16",
            "checkpoint.every_epochs=0",
        ],
        capture_output=True,
        text=True,
        timeout=1800,  # CPU time measured 6.4 min (4 pretrainings, 12 evaluations); a loaded VM: 15+ min wall
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    rows = json.loads((workdir / "compare.json").read_text())
    pretrain = [r for r in rows["rows"] if r.get("kind") == "pretrain"]
    floors = [r for r in rows["rows"] if r.get("kind") == "random_init"]
    pixels = [r for r in rows["rows"] if r.get("kind") == "pixels"]
    assert len(pretrain) == 4 and len(floors) == 1 and len(pixels) == 1  # two seeds per setting
    assert pixels[0]["name"] == "raw pixels" and pixels[0]["linear_top1"] > 50.0  # chance: 10 %
    assert pixels[0]["knn_top1"] > 50.0 and floors[0]["knn_top1"] > 20.0  # the kNN floors beside the linear
    assert sorted((r["unmix"], r["seed"]) for r in pretrain) == [("off", 0), ("off", 1), ("on", 0), ("on", 1)]
    assert [(g["unmix"], g["n"]) for g in rows["groups"]] == [("off", 2), ("on", 2)]
    assert "Un-Mix gain, kNN top-1:" in out and "over 2 seed pairs" in out
    assert "raw pixels" in out and "random init" in out
    for r in pretrain:
        assert r["linear_top1"] is not None and 0 < r["linear_top1"] <= 100
        assert r["knn_top1"] is not None
    assert len(rows["pairs"]) == 1 and rows["pairs"][0]["seeds"] == [0, 1]
    assert (workdir / "compare.png").stat().st_size > 10_000
    for name in ("mocov2_s0", "mocov2_unmix_s0", "mocov2_s1", "mocov2_unmix_s1"):
        assert (workdir / "runs" / name / "backbone.pt").is_file()
    # the default probe, logreg on cached features, on every backbone and floor, its L2 chosen by the search
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for name in ("mocov2_s0", "mocov2_unmix_s0", "random_init", "pixels"):
        lin = json.loads((workdir / "runs" / name / "linear.json").read_text())
        assert (lin["protocol"], lin["features"], lin["val_samples"]) == ("logreg", "cached", 359), lin
        assert "logreg_l2_chosen" in client.get_run(lin["run_id"]).data.metrics


def _result(linear: float, knn: float) -> dict:
    return {"linear": {"top1": linear}, "knn": {"top1": knn}}


def test_summary_says_what_is_within_noise():
    from unmix.demo import summary

    results = {
        "mocov2_s0": _result(90.0, 80.0),
        "mocov2_unmix_s0": _result(91.0, 85.0),
        "mocov2_s1": _result(92.0, 82.0),
        "mocov2_unmix_s1": _result(91.0, 87.5),
        "random_init": _result(93.0, 70.0),
        "pixels": _result(94.0, 81.0),
    }
    pairs = [
        {
            "seeds": [0, 1],
            "gain_linear_top1": 0.0,
            "gain_linear_top1_lo": -12.7,
            "gain_linear_top1_hi": 12.7,
            "gain_linear_top1_verdict": "within noise",
            "gain_knn_top1": 5.25,
            "gain_knn_top1_lo": 2.07,
            "gain_knn_top1_hi": 8.43,
            "gain_knn_top1_verdict": "Un-Mix better",
        }
    ]
    text = summary(results, pairs, 2)
    lines = text.splitlines()
    assert "mean ± std over 2 seed(s)" in lines[0]
    assert any(line.split()[:5] == ["mocov2", "91.00", "±", "1.41", "81.00"] for line in lines), text
    assert any(line.split()[:4] == ["raw", "pixels", "94.00", "81.00"] for line in lines), text
    assert any(line.split()[:4] == ["random", "init", "93.00", "70.00"] for line in lines), text
    assert "linear: 0 of 4 pretrained run(s) above the better floor (94.00 %)" in text
    assert "kNN: 3 of 4 pretrained run(s) above the better floor (81.00 %)" in text
    assert (
        "Un-Mix gain, linear top-1: +0.00 points, 95 % interval [-12.70, +12.70] over 2 seed pairs: "
        "WITHIN NOISE" in text
    )
    assert (
        "Un-Mix gain, kNN top-1: +5.25 points, 95 % interval [+2.07, +8.43] over 2 seed pairs: Un-Mix better"
        in text
    )
    assert "±12.7 standard errors" in text

    one = summary({k: v for k, v in results.items() if not k.endswith("_s1")}, [{**pairs[0], "seeds": [0],
        "gain_knn_top1_lo": None, "gain_linear_top1_lo": None}], 1)  # fmt: skip
    assert "from 1 seed pair: no interval, not a result" in one
