"""The local test cluster itself, and what a job sees on it: two nodes, resolvable names, the
trainer's SLURM_* -> RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT mapping under srun."""

from __future__ import annotations

import json
import socket
import sys

import pytest

pytestmark = pytest.mark.slurm


def test_two_idle_nodes(slurm_cluster):
    out = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%N %t %c")
    nodes = sorted(line.split() for line in out.splitlines())
    assert nodes == [["node1", "idle", "2"], ["node2", "idle", "2"]]


def test_srun_spans_both_nodes_and_maps_ranks(slurm_cluster, tmp_path):
    """A 2-node step: each task maps SLURM_* with unmix.training.dist and can reach MASTER_ADDR by name."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, os, socket\n"
        "from unmix.training.dist import map_slurm_env\n"
        "map_slurm_env()\n"
        "keys = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURMD_NODENAME')\n"
        "rec = {k: os.environ.get(k) for k in keys}\n"
        "rec['master_ip'] = socket.gethostbyname(rec['MASTER_ADDR'])\n"
        "print(json.dumps(rec), flush=True)\n"
    )
    out = slurm_cluster.run(
        "srun", "--nodes=2", "--ntasks-per-node=1", "--time=2", sys.executable, str(probe), timeout=120
    )
    recs = sorted(
        (json.loads(line) for line in out.splitlines() if line.startswith("{")), key=lambda r: r["RANK"]
    )
    assert [r["RANK"] for r in recs] == ["0", "1"]
    assert {r["SLURMD_NODENAME"] for r in recs} == {"node1", "node2"}
    assert all(r["WORLD_SIZE"] == "2" and r["LOCAL_RANK"] == "0" for r in recs)
    assert {r["MASTER_ADDR"] for r in recs} == {"node1"}
    assert len({r["MASTER_PORT"] for r in recs}) == 1
    assert recs[0]["master_ip"] == socket.gethostbyname("node1") == "127.0.0.1"
