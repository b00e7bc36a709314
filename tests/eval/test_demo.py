"""`unmix demo`, shortened (1 pretraining epoch, a narrow backbone, 2 linear epochs), end to end."""

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
            "--linear-epochs",
            "5",
            "optim.epochs=1",
            "model.width=16",
            "checkpoint.every_epochs=0",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "DS_ACCELERATOR": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    rows = json.loads((workdir / "compare.json").read_text())
    pretrain = [r for r in rows["rows"] if r.get("kind") == "pretrain"]
    floors = [r for r in rows["rows"] if r.get("kind") == "random_init"]
    pixels = [r for r in rows["rows"] if r.get("kind") == "pixels"]
    assert len(pretrain) == 2 and len(floors) == 1 and len(pixels) == 1
    assert pixels[0]["name"] == "raw pixels" and pixels[0]["linear_top1"] > 50.0  # chance: 10 %
    assert sorted(r["unmix"] for r in pretrain) == ["off", "on"]
    for r in pretrain:
        assert r["linear_top1"] is not None and 0 < r["linear_top1"] <= 100
        assert r["knn_top1"] is not None
    assert len(rows["pairs"]) == 1
    assert (workdir / "compare.png").stat().st_size > 10_000
    for name in ("mocov2", "mocov2_unmix"):
        assert (workdir / "runs" / name / "backbone.pt").is_file()
    # (b) the default probe on a pretrained backbone trains without its loss rising
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for name in ("mocov2", "mocov2_unmix"):
        run_id = json.loads((workdir / "runs" / name / "linear.json").read_text())["run_id"]
        losses = [
            m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)
        ]
        assert len(losses) == 5 and losses[-1] < losses[0] and max(losses) == losses[0], losses
