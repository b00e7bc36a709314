"""Data faults in ``unmix train``: one line naming the path and the fault, exit 2, before any process group,
DeepSpeed engine or MLflow run exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unmix.cli import main


def _config(tmp: Path, train: Path | str) -> Path:
    cfg = {
        "data": {"train": str(train), "device": "cpu", "crop": 16, "threads": 1},
        "model": {"arch": "resnet10", "width": 16},
        "optim": {"epochs": 1, "batch_size": 8},
        "deepspeed": {"precision": "fp32"},
        "output_dir": str(tmp / "runs" / "run"),
    }
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _damage(kind: str, shards: Path) -> Path:
    """Damage the copy ``shards``; returns what to pass as data.train."""
    if kind == "missing":
        return shards.parent / "no_such_dir"
    if kind == "file":
        (shards.parent / "notes.txt").write_text("hello")
        return shards.parent / "notes.txt"
    if kind == "idx":
        (shards / "val-000002.idx").unlink()
    elif kind == "manifest":
        (shards / "manifest.json").write_text("garbage {")
    elif kind == "truncated":
        tar = shards / "val-000001.tar"
        tar.write_bytes(tar.read_bytes()[:-2048])
    return shards


CASES = {
    "missing": r"data.train=.*no_such_dir: no such directory",
    "file": r"data.train=.*notes.txt: is a file, not a shard directory",
    "idx": r"index .*val-000002.idx of shard val-000002.tar is missing",
    "manifest": r"cannot read shard manifest .*manifest.json",
    "truncated": r"val-000001.tar does not match its manifest: .*run `unmix shards verify",
}


@pytest.mark.parametrize("kind", list(CASES))
def test_data_fault_is_one_line_with_exit_2(kind, sample_val, tmp_path, capsys, monkeypatch):
    import re

    monkeypatch.setattr("unmix.training.preemption.record_early", lambda: None)  # no handlers left in pytest
    train = _damage(kind, Path(shutil.copytree(sample_val, tmp_path / "shards")))
    assert main(["train", str(_config(tmp_path, train))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unmix train: error: "), err
    assert re.search(CASES[kind], err), err
    assert not (tmp_path / "runs").exists()  # no output_dir, no mlflow.db beside it


def test_truncated_tar_exits_2_without_traceback_or_mlflow(sample_val, tmp_path):
    train = _damage("truncated", Path(shutil.copytree(sample_val, tmp_path / "shards")))
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(
        [sys.executable, "-m", "unmix", "train", str(_config(tmp_path, train))],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "does not match its manifest" in r.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()
