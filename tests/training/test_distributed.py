"""Two processes (gloo) for each method, Un-Mix on and off, ZeRO 0 and 2: loss finite and falling on a
repeated batch; target network, queue and online weights bitwise identical on both ranks; Shuffle-BN's
gather of channels_last images (fp32, and bf16 under autocast)."""

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
    "simclr unmix=True zero=0 lars",
]


def test_shuffle_bn_across_ranks(results):
    (r,) = [r for r in results if r["case"] == "shuffle_bn_roundtrip"]
    assert r["order_kept"] and r["bn_stats_mixed_across_ranks"], r


def test_gather_channels_last_intact_and_bf16_under_autocast(results):
    (r,) = [r for r in results if r["case"] == "gather_channels_last"]
    assert r["fp32_exact"] and r["fp32_channels_last"] and r["bf16_channels_last"], r  # the model's layout
    assert r["bf16_dtype"] == "torch.bfloat16" and r["bf16_exact"], r
    assert r["autocast_order_kept"], r
    assert r["encoder_input_channels_last"], r  # the key encoder runs in the model's layout


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


def test_gather_buffers_are_plain_contiguous_whatever_the_input_layout(monkeypatch):
    """The NCCL failure of pytorch#163483 needs CUDA, but its cause is checkable here: the send and receive
    buffers handed to torch.distributed.all_gather must be plain contiguous even for channels_last
    input (empty_like would make them channels_last, which old NCCL builds filled as NCHW bytes); the
    result comes back in the input's layout (channels_last: the key encoder's layout)."""
    import torch
    import torch.distributed as tdist

    from unmix.training import dist

    seen = []

    def fake_all_gather(out, x, group=None):
        seen.append([o.is_contiguous() for o in out] + [x.is_contiguous()])
        for o in out:
            o.copy_(x)

    monkeypatch.setattr(tdist, "all_gather", fake_all_gather)
    monkeypatch.setattr(tdist, "get_world_size", lambda group=None: 2)
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    y = dist.gather_rows(x)
    assert seen == [[True, True, True]]
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(y, torch.cat([x, x]))
    plain = torch.randn(2, 3, 4, 5)
    assert dist.gather_rows(plain).is_contiguous() and seen[-1] == [True, True, True]
