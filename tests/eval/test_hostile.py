"""Evaluation side: hostile and damaged inputs to ``unmix linear`` / ``knn`` / ``compare``.

Each test builds its input and asserts: exit status 2 and one line naming the file/key/value, nothing the
input carries runs, nothing is created where the input says (items 1, 10, 13).
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unmix.cli import main
from unmix.eval.eval_runs import resolve_tracking_uri
from unmix.eval.linear import check_labels, checked

NO_CROP = ["device=cpu", "data.crop=16", "batch_size=64", "num_threads=1"]


class RunsCode:
    """Unpickling this calls ``os.system`` (pickled as ``posix.system``): it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _one_line(err: str, command: str) -> str:
    lines = err.strip().splitlines()
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith(f"unmix {command}: error: "), err
    return lines[-1]


# ----------------------------------------------------------------------- item 1/13: backbone with code


@pytest.mark.parametrize("fmt", ["torch.save", "pickle"])
def test_backbone_holding_code_is_refused_and_nothing_runs(tmp_path, capsys, fmt):
    marker = tmp_path / "ran"
    evil = tmp_path / "backbone.pt"
    payload = {"state_dict": {}, "meta": {"arch": "resnet10", "x": RunsCode(marker)}}
    if fmt == "torch.save":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=2))
    args = ["linear", "--backbone", str(evil), "--train", str(tmp_path), "--val", str(tmp_path)]
    assert main([*args, "--no-mlflow", "device=cpu"]) == 2
    line = _one_line(capsys.readouterr().err, "linear")
    assert line == f"unmix linear: error: {evil}: refused: it holds code (global posix.system)"
    assert not marker.exists()


# ------------------------------------------------------------------ item 10: where the results are logged


def test_backbone_store_is_used_only_when_local_and_present(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    chosen = tmp_path / "chosen" / "mlflow.db"
    for uri, why in (
        (f"sqlite:///{chosen}", f"no SQLite database at {chosen}"),
        ("http://collector.example.org:5000", "not a local store"),
        ("postgresql://db.example.org/mlflow", "not a local store"),
        (f"file://{tmp_path / 'nowhere'}", f"no store directory at {tmp_path / 'nowhere'}"),
    ):
        assert resolve_tracking_uri(None, uri, announce=True) is None
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"note: not logging to the backbone's tracking store '{uri}': {why}"), err
        assert len(err.splitlines()) == 1
    assert not chosen.parent.exists()
    assert resolve_tracking_uri("sqlite:///mine.db", "http://x") == "sqlite:///mine.db"


def test_knn_never_creates_the_database_a_backbone_names(
    sample_train, sample_val, tmp_path, monkeypatch, capsys
):
    """A received backbone.pt naming ``sqlite:///<somewhere>/evil.db``: the eval logs to MLflow's default
    store in the working directory, says so in one line, and creates nothing at the named path."""
    from unmix.training.backbone_file import BackboneMeta, save_backbone
    from unmix.training.backbones import build_backbone

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    chosen = tmp_path / "somewhere" / "evil.db"
    torch.manual_seed(0)
    net = build_backbone("resnet10", crop=16, width=8)
    meta = BackboneMeta.of(net, mlflow_tracking_uri=f"sqlite:///{chosen}", mlflow_run_id="0" * 32, crop=16)
    path = save_backbone(tmp_path / "backbone.pt", net, meta)
    args = ["knn", "--backbone", str(path), "--train", str(sample_train), "--val", str(sample_val)]
    assert main([*args, "--k", "5", *NO_CROP]) == 0
    err = capsys.readouterr().err
    assert f"note: not logging to the backbone's tracking store 'sqlite:///{chosen}'" in err
    assert not chosen.parent.exists()
    assert (tmp_path / "mlflow.db").is_file()  # MLflow's default, in the working directory


def test_compare_reads_only_existing_stores(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a store\n")
    db = tmp_path / "runs.db"
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{db}").search_experiments()  # a real, empty SQLite store
    cases = (
        (str(notes), f"tracking store {notes}: {notes} is a file, not a store directory"),
        (str(db), f"is a file, not a store directory; for an SQLite store give sqlite:///{db}"),
        (
            f"sqlite:///{tmp_path / 'typo.db'}",
            f"no such database {tmp_path / 'typo.db'} (nothing was created)",
        ),
        (f"sqlite:///{notes}", f"{notes} is not an SQLite database"),
        (str(tmp_path / "mlrunz"), f"no such directory {tmp_path / 'mlrunz'} (nothing was created)"),
        (None, f"no such database {tmp_path / 'mlflow.db'}"),  # MLflow's default, absent here
    )
    for uri, needle in cases:
        assert main(["compare", *(["--tracking-uri", uri] if uri else [])]) == 2
        line = _one_line(capsys.readouterr().err, "compare")
        assert needle in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "runs.db"]  # nothing created
    assert main(["compare", "--tracking-uri", f"sqlite:///{db}"]) == 0


# ---------------------------------------------------------------- item 13: damaged inputs, unwritable paths


def test_malformed_manifest_is_one_line(sample_train, sample_val, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(sample_train, train)
    for content in ("[]", "null", '{"format": "unmix-webdataset", "version": 1, "shards": 3}'):
        (train / "manifest.json").write_text(content)
        args = ["knn", "--random-init", "resnet10", "--width", "8", "--train", str(train)]
        assert main([*args, "--val", str(sample_val), "--no-mlflow", *NO_CROP]) == 2
        line = _one_line(capsys.readouterr().err, "knn")
        assert f"malformed shard manifest {train / 'manifest.json'}" in line, line


def test_out_of_range_label_in_linear_names_the_shards():
    ok = (torch.zeros(4, 3), torch.tensor([0, 1, 9, 2]))
    bad = (torch.zeros(4, 3), torch.tensor([0, 12, 3, 1]))
    assert list(checked([ok], 10, "train/")) == [ok]
    with pytest.raises(ValueError, match=r"^train/: label 12 is outside the manifest's classes \[0, 9\]$"):
        list(checked([ok, bad], 10, "train/"))
    with pytest.raises(ValueError, match="val/: label -3 is outside"):
        check_labels(torch.tensor([-3, 0]), 10, "val/")


def test_json_into_a_read_only_directory_is_refused_before_any_work(sample_train, sample_val, tmp_path):
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs `unshare -m` (root) for a real read-only file system")
    ro = tmp_path / "ro"
    ro.mkdir()
    cmd = (
        f"{sys.executable} -m unmix knn --random-init resnet10 --width 8 --train {sample_train} "
        f"--val {sample_val} --no-mlflow --json {ro}/knn.json device=cpu data.crop=16"
    )
    script = f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec {cmd}"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_line(proc.stderr, "knn")
    assert line == f"unmix knn: error: --json directory {ro}: cannot write there: read-only file system"
    assert "knn top-1" not in proc.stdout  # refused before the evaluation ran


# ----------------------------------------------------------------------- item 9: eval numbers


@pytest.mark.parametrize(
    ("key", "value"),
    [("lr", v) for v in ("nan", "inf", "-1", "0")] + [("weight_decay", v) for v in ("nan", "inf", "-1")],
)
def test_linear_refuses_non_finite_or_out_of_range_numbers(tmp_path, capsys, key, value):
    args = ["linear", "--random-init", "resnet10", "--train", str(tmp_path), "--val", str(tmp_path)]
    assert main([*args, "--no-mlflow", "protocol=moco", "device=cpu", f"{key}={value}"]) == 2
    line = _one_line(capsys.readouterr().err, "linear")
    assert f"{key}=" in line and "finite" in line


@pytest.mark.parametrize(("option", "value"), [("--t", "nan"), ("--t", "inf"), ("--t", "0"), ("--k", "0")])
def test_knn_refuses_non_finite_or_out_of_range_options(tmp_path, capsys, option, value):
    args = ["knn", "--random-init", "resnet10", "--train", str(tmp_path), "--val", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--no-mlflow", option, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and f"argument {option}: {value}: must be" in err[-1]
