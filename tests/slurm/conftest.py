"""A real Slurm cluster for the tests in this directory: munged, slurmctld and slurmd ``node1``/``node2``.

Started once per session by ``slurm/localcluster.py`` in a private directory, stopped (every job
cancelled, every daemon ended) at the end. Without Slurm installed the tests skip saying so; with
``CI`` set they fail instead, because a skipped cluster test in CI would hide a broken product.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SLURM_DIR = REPO / "slurm"


def _load_localcluster():
    spec = importlib.util.spec_from_file_location("unmix_localcluster", SLURM_DIR / "localcluster.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


localcluster = _load_localcluster()


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"CI is set but the Slurm tests cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A started two-node cluster (``node1``, ``node2``, 2 CPUs each); stopped after the session."""
    missing = localcluster.slurm_installed()
    if missing:
        _unavailable(
            f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        _unavailable("the local Slurm cluster runs slurmd as root; run the Slurm tests as root")
    # Short path: the munge socket lives inside it (Unix socket paths are limited to 107 bytes).
    root = Path(tempfile.mkdtemp(prefix="unmix-slurm-", dir="/tmp"))
    cluster = localcluster.LocalCluster(root, nodes=2, cpus=2, kill_wait=30)
    try:
        cluster.start(timeout=60)
    except Exception as exc:
        cluster.stop()
        _unavailable(f"the local Slurm cluster did not start: {exc}")
    handle = SlurmCluster(cluster)
    try:
        yield handle
    finally:
        cluster.stop()
        # Keep the daemons' logs (and the job-completion log) with the test session's files.
        keep = tmp_path_factory.mktemp("slurm-logs")
        shutil.copytree(root / "log", keep, dirs_exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)


class SlurmCluster:
    """Client-side helpers: run commands against the cluster, read job records, wait for states."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.root: Path = cluster.root

    def env(self, **extra: str) -> dict[str, str]:
        env = self.cluster.env()
        env.update(extra)
        return env

    def run(self, *args: str, timeout: float = 60, check: bool = True, **extra_env: str) -> str:
        proc = subprocess.run(
            [str(a) for a in args], env=self.env(**extra_env), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc.stdout

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` as a dict ({} once the controller has forgotten the job)."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=15)
        fields: dict[str, str] = {}
        for m in re.finditer(r"(\S+?)=(.*?)(?= \S+?=|$)", out.strip()):
            fields.setdefault(m.group(1), m.group(2))
        return fields

    def state(self, job_id: str | int) -> str:
        return self.job(job_id).get("JobState", "")

    def wait_state(self, job_id: str | int, states: set[str], timeout: float, log: Path | None = None) -> str:
        """Poll until the job is in one of ``states``; fail with its record and log otherwise."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.state(job_id)
            if state in states:
                return state
            time.sleep(1.0)
        raise AssertionError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f}s (state {state!r})\n"
            f"{self.job(job_id)}\n{self.tail(log)}\n{self.cluster.logs(lines=15)}"
        )

    def job_processes(self, job_id: str | int) -> list[int]:
        """Processes of the job still alive on this machine: its slurmstepd and its tasks."""
        stepd = f"slurmstepd: [{job_id}.".encode()
        marks = (f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_CONF={self.cluster.conf}".encode())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "cmdline").read_bytes().startswith(stepd):
                    found.append(int(entry.name))
                    continue
                env = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if all(m in env for m in marks):
                found.append(int(entry.name))
        return found

    def jobcomp(self, job_id: str | int) -> list[dict[str, str]]:
        """The job's records in the job-completion log (one per end, requeues included)."""
        path = self.root / "log" / "jobcomp.txt"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            rec = dict(kv.split("=", 1) for kv in line.split() if "=" in kv)
            if rec.get("JobId") == str(job_id):
                out.append(rec)
        return out

    @staticmethod
    def tail(log: Path | None, lines: int = 60) -> str:
        if log is None or not Path(log).exists():
            return f"(no log {log})"
        return f"==> {log} <==\n" + "\n".join(Path(log).read_text(errors="replace").splitlines()[-lines:])
