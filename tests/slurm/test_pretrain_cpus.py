"""pretrain.sbatch's CPUs per task, run as a plain bash script with Slurm's variables set and ``srun``,
``unmix`` and ``nproc`` stubbed (no cluster needed): the default is the job's CPUs on the node shared by
its tasks, and a GPU run with fewer than 4 CPUs per task is refused with the value to resubmit with."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SBATCH = Path(__file__).resolve().parents[2] / "slurm" / "pretrain.sbatch"


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # srun: print its arguments up to the command, then succeed
    (bin_dir / "srun").write_text('#!/bin/bash\necho "SRUN $*"\n')
    (bin_dir / "unmix").write_text("#!/bin/bash\nexit 0\n")
    (bin_dir / "nproc").write_text("#!/bin/bash\necho 96\n")  # the node: 96 CPUs
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _run(stubs: Path, **slurm: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNMIX_"))}
    env.update({"PATH": f"{stubs}:{env['PATH']}", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1", **slurm})
    return subprocess.run(
        ["bash", str(SBATCH), "cfg.yaml"], env=env, capture_output=True, text=True, timeout=60
    )


def _srun_cpus(out: str) -> tuple[str, str]:
    (line,) = [x for x in out.splitlines() if x.startswith("SRUN ")]
    cpus = line.split("--cpus-per-task=")[1].split()[0]
    threads = line.split("data.threads=")[1].split()[0]
    return cpus, threads


def test_gpu_run_without_cpus_per_task_takes_the_nodes_cpus_per_task(stubs):
    out = _run(stubs, SLURM_CPUS_ON_NODE="96", SLURM_TASKS_PER_NODE="8(x2)", SLURM_GPUS_ON_NODE="8")
    assert out.returncode == 0, out.stderr
    assert _srun_cpus(out.stdout) == ("12", "12")  # 96 CPUs / 8 tasks; DALI gets all of them


def test_explicit_cpus_per_task_wins(stubs):
    out = _run(
        stubs,
        SLURM_CPUS_PER_TASK="6",
        SLURM_CPUS_ON_NODE="96",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_GPUS_ON_NODE="8",
    )
    assert out.returncode == 0, out.stderr
    assert _srun_cpus(out.stdout) == ("6", "6")


def test_gpu_run_with_fewer_than_4_cpus_per_task_is_refused(stubs):
    # Slurm's default allocation: one CPU per task
    out = _run(stubs, SLURM_CPUS_ON_NODE="8", SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="8")
    assert out.returncode == 2 and "SRUN" not in out.stdout
    assert "1 CPU(s) per task on a GPU run" in out.stderr and "--cpus-per-task=12" in out.stderr
    ok = _run(
        stubs,
        SLURM_CPUS_ON_NODE="8",
        SLURM_NTASKS_PER_NODE="8",
        SLURM_GPUS_ON_NODE="8",
        UNMIX_MIN_CPUS="1",
    )
    assert ok.returncode == 0 and _srun_cpus(ok.stdout) == ("1", "1")


def test_cpu_runs_may_use_one_cpu(stubs):
    out = _run(stubs, SLURM_CPUS_ON_NODE="2", SLURM_NTASKS_PER_NODE="2")
    assert out.returncode == 0, out.stderr
    assert _srun_cpus(out.stdout) == ("1", "1")


SUBMIT = SBATCH.with_name("submit.sh")


def _submit(stubs: Path, tmp_path: Path, sinfo: str, *extra: str) -> subprocess.CompletedProcess:
    import sys

    (stubs / "sinfo").write_text(f'#!/bin/bash\necho "{sinfo}"\n')
    (stubs / "sinfo").chmod(0o755)
    (tmp_path / "exp.yaml").write_text("data: {train: shards/train, val: shards/val}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNMIX_", "MLFLOW_"))}
    env.update({"PATH": f"{stubs}:{env['PATH']}", "UNMIX_PYTHON": sys.executable})
    cmd = [str(SUBMIT), "--dry-run", "--gpus-per-node", "8", *extra, "exp.yaml"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_submit_defaults_cpus_per_task_to_the_partitions_cpus_per_gpu(stubs, tmp_path):
    out = _submit(stubs, tmp_path, "48+")  # heterogeneous partition: the smallest node has 48 CPUs
    assert out.returncode == 0, out.stderr
    pretrain = out.stdout.splitlines()[0]
    assert "--cpus-per-task=6" in pretrain
    given = _submit(stubs, tmp_path, "48", "--cpus-per-task", "10")
    assert "--cpus-per-task=10" in given.stdout.splitlines()[0]
    few = _submit(stubs, tmp_path, "16")  # 2 CPUs per GPU task
    assert few.returncode != 0 and "fewer than 4 per GPU task" in few.stderr
