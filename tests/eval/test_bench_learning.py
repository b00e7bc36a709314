"""``unmix bench learning``: one real (one-epoch) run, read back from its MLflow record by the command,
the summary and table, and the command's refusals."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from unmix.eval.bench_learning import Lift, format_table, summarise

DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI")


def test_one_run_reports_its_floor_and_its_end(tmp_path):
    """The command in its own process (``unmix train`` joins a process group and sets MASTER_PORT, which
    must not leak into later tests): one seed, one epoch, the JSON it writes."""
    out = tmp_path / "learning.json"
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="2")
    cmd = ["bench", "learning", "optim.epochs=1", "--seeds", "1", "--method", "simclr", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "-m", "unmix", *cmd], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (r,) = json.loads(out.read_text())["runs"]
    assert (r["method"], r["seed"], r["steps"]) == ("simclr", 0, 22)  # 1,438 images, batch 64: 22 steps
    assert 30 < r["init"] < 60, r  # a random network's kNN here: far from chance (10) and from solved
    assert 0 < r["final"] <= 100
    assert "| simclr | 22 |" in proc.stdout and "init knn top-1" in proc.stderr


def test_summary_and_table():
    lifts = [Lift("byol", s, 45.0, 45.0 + d, 198, 60.0) for s, d in enumerate([6.0, 1.0, 9.0])]
    lifts.append(Lift("simclr", 0, 44.0, 46.0, 110, 50.0))
    s = summarise(lifts)
    assert s["byol"]["lift"] == {"median": 6.0, "min": 1.0, "max": 9.0} and s["byol"]["lifted"] == 2
    assert s["simclr"]["lifted"] == 0  # +2 is not more than 2
    table = format_table(s)
    assert (
        "| byol | 198 | 45.0 (45.0 to 45.0) | 51.0 (46.0 to 54.0) | +6.0 (+1.0 to +9.0) | 2 of 3 |" in table
    )
    assert table.splitlines()[-1].endswith("| 0 of 1 |")


def test_command_refuses_bad_input(tmp_path, capsys):
    from unmix.eval.bench_learning import main

    args = argparse.Namespace(seeds=0, method=["byol"], data=None, json=None, overrides=[])
    assert main(args) == 2 and "--seeds must be >= 1" in capsys.readouterr().err
    args = argparse.Namespace(seeds=1, method=["byol"], data=str(tmp_path), json=None, overrides=[])
    assert main(args) == 2 and "no train/manifest.json" in capsys.readouterr().err
