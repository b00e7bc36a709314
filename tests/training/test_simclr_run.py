"""SimCLR + Un-Mix end to end on the CPU with `unmix train` on tiny real shards (48 digits, 6 steps per
epoch, fp32, LARS with warm-up + cosine): SIGTERM mid-epoch then resume == an uninterrupted run, bitwise;
backbone.pt exported; one MLflow run with the loss parts; `unmix linear` / `unmix knn` on the export;
and `unmix bench train` reports SimCLR's step cost."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _helpers():
    """test_fault_tolerance's tiny shards and `unmix train` job helpers (pytest's importlib mode puts no
    test directory on sys.path, so the module is loaded from its file)."""
    path = Path(__file__).with_name("test_fault_tolerance.py")
    spec = importlib.util.spec_from_file_location("_unmix_fault_tolerance_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ft = _helpers()
tiny_train = _ft.tiny_train  # a fixture: 48 digits as their own shard set
STEPS_PER_EPOCH, DIST_KEYS, Job, _config = _ft.STEPS_PER_EPOCH, _ft.DIST_KEYS, _ft.Job, _ft._config
_assert_bitwise, _final_state, _metric_history = _ft._assert_bitwise, _ft._final_state, _ft._metric_history

SIMCLR = {
    "method.name": "simclr",
    "method.simclr.T": 0.5,
    "method.simclr.proj_hidden_dim": 32,
    "method.simclr.proj_dim": 16,
    "data.recipe": "simclr_cifar",
    "optim.optimizer": "lars",
    "optim.lr": 0.3,
    "optim.weight_decay": 1.0e-4,
    "optim.warmup_epochs": 1,
    "mlflow.experiment": "simclr",
}


@pytest.mark.slow  # three `unmix train` launches, then a linear probe and kNN
def test_simclr_unmix_trains_resumes_bitwise_exports_and_evaluates(
    tiny_train,
    sample_train,
    sample_val,
    tmp_path,
):
    from mlflow.tracking import MlflowClient

    from unmix.cli import main

    total = 2 * STEPS_PER_EPOCH
    straight_out, resumed_out = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    straight = Job(_config(tmp_path, tiny_train, straight_out, **SIMCLR))
    cfg = _config(tmp_path, tiny_train, resumed_out, **SIMCLR)
    job = Job(cfg)
    job.wait_for(lambda: job.logged_step(8))
    job.proc.send_signal(signal.SIGTERM)  # mid-epoch 2: finishes the step, checkpoints, exits 75
    assert job.finish() == 75, job.text[-3000:]
    job = Job(cfg)
    assert job.finish() == 0, job.text[-3000:]
    assert "resumed from" in job.text
    assert straight.finish() == 0, straight.text[-3000:]

    a, b = _final_state(straight_out, total), _final_state(resumed_out, total)
    for key in ("module", "optimizer", "method", "step", "epoch", "pos"):
        _assert_bitwise(a[key], b[key], key)  # online weights, LARS momentum; SimCLR keeps no state
    assert a["method"] == {}
    _assert_bitwise(
        torch.load(straight_out / "backbone.pt")["state_dict"],
        torch.load(resumed_out / "backbone.pt")["state_dict"],
    )
    meta = torch.load(resumed_out / "backbone.pt", weights_only=False)["meta"]
    assert meta["method"] == "simclr" and meta["unmix"] is True

    run_id, loss = _metric_history(resumed_out)
    assert [s for s, _ in loss] == list(range(1, total + 1))  # one run, each step once
    assert [v for _, v in loss] == [v for _, v in _metric_history(straight_out)[1]]
    client = MlflowClient(meta["mlflow_tracking_uri"])
    run = client.get_run(run_id)
    assert run.data.params["method.name"] == "simclr" and run.info.status == "FINISHED"
    for key in ("loss_clean", "loss_mix", "lam"):
        assert key in run.data.metrics
    assert run.data.metrics["loss_mix"] > 0

    lin_json, knn_json = tmp_path / "lin.json", tmp_path / "knn.json"
    args = [
        "--backbone",
        str(resumed_out / "backbone.pt"),
        "--train",
        str(sample_train),
        "--val",
        str(sample_val),
    ]
    fast = ["device=cpu", "num_threads=1", "batch_size=128"]
    assert (
        main(["linear", *args, "--json", str(lin_json), "epochs=1", "features=cached", "lr=0.1", *fast]) == 0
    )
    assert main(["knn", *args, "--json", str(knn_json), "--k", "20", *fast]) == 0
    lin, knn = json.loads(lin_json.read_text()), json.loads(knn_json.read_text())
    assert lin["pretrain_run_id"] == knn["pretrain_run_id"] == run_id
    assert 10.0 < knn["top1"] <= 100.0 and 0.0 <= lin["top1"] <= 100.0
    after = client.get_run(run_id).data.metrics
    assert after["knn_top1"] == pytest.approx(knn["top1"]) and after["linear_top1"] == pytest.approx(
        lin["top1"]
    )


def test_bench_train_reports_simclr_step_cost(tiny_train, tmp_path):
    """In a subprocess: the benchmark initialises a process group, which must not outlive it."""
    out = tmp_path / "bench.json"
    overrides = [f"{k}={v}" for k, v in SIMCLR.items() if not k.startswith("mlflow")]
    config = _config(tmp_path, tiny_train, tmp_path / "bench" / "run")
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "unmix.cli", "bench", "train", str(config), *overrides]
    cmd += ["--steps", "2", "--repeats", "1", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unmix bench train: simclr" in proc.stdout and "expected ~1.5x" in proc.stdout
    res = json.loads(out.read_text())
    assert res["method"] == "simclr"
    assert res["unmix_step_cost"] > 0 and res["unmix_step_cost_plain"] > 0
    assert set(res["steps_per_s"]) == {"trainer_off", "plain_off", "trainer_on", "plain_on"}
