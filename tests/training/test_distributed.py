"""Two processes (gloo) for each method, Un-Mix on and off, ZeRO 0 and 2: loss finite and falling on a
repeated batch; target network, queue and online weights bitwise identical on both ranks."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("mp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("mp") / "results.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        str(out),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


CASES = [
    "moco_v2 unmix=True zero=0 sgd",
    "moco_v2 unmix=False zero=2 sgd",
    "byol unmix=True zero=2 sgd",
    "byol unmix=False zero=0 lars",
]


def test_shuffle_bn_across_ranks(results):
    (r,) = [r for r in results if r["case"] == "shuffle_bn_roundtrip"]
    assert r["order_kept"] and r["bn_stats_mixed_across_ranks"], r


@pytest.mark.parametrize("case", CASES)
def test_two_ranks(results, case):
    (r,) = [r for r in results if r["case"] == case]
    assert r["world"] == 2
    assert all(math.isfinite(x) for x in r["losses"])
    if r["fixed_queue_losses"]:  # MoCo: against the initial negatives (see mp_worker._loss_against)
        before, after = r["fixed_queue_losses"]
        assert after < before - 0.05, r
    else:
        assert r["losses"][-1] < r["losses"][0] - 0.05, r
    assert r["target_identical_at_start"] and r["target_identical"], r
    assert r["online_identical"], r
    if case.startswith("moco"):
        assert r["queue_identical"], r
