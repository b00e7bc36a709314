"""submit.sh and sweep.sh as command lines (``--dry-run``: nothing is queued, no Slurm needed).

What they would submit: resources, the dependency, pass-through sbatch options, the config resolved by
the trainer (bad keys refused before anything is queued), absolute paths, and for the sweep one
pretraining + evaluation pair per (Un-Mix off/on, seed) in one MLflow store.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm" / "submit.sh"
SWEEP = REPO / "slurm" / "sweep.sh"

CONFIG = """\
data: {train: shards/train, val: shards/val, crop: 32}
model: {arch: resnet18}
output_dir: runs/exp
mlflow: {experiment: sweep-test}
"""


def _run(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNMIX_", "MLFLOW_"))}
    env["UNMIX_PYTHON"] = sys.executable
    return subprocess.run([str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _commands(stdout: str) -> list[list[str]]:
    return [shlex.split(line) for line in stdout.splitlines() if "sbatch" in line]


def test_submit_dry_run_gpu(tmp_path):
    (tmp_path / "exp.yaml").write_text(CONFIG)
    out = _run(
        SUBMIT,
        "--dry-run",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "12",
        "--partition",
        "gpu",
        "--time",
        "2-00:00:00",
        "--account=proj",
        "--qos=high",
        "exp.yaml",
        "optim.epochs=100",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    pretrain, evaluate = _commands(out.stdout)
    assert pretrain[0] == "sbatch" and pretrain[-3:] == [
        str(REPO / "slurm" / "pretrain.sbatch"),
        str(tmp_path / "exp.yaml"),
        "optim.epochs=100",
    ]
    for opt in (
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--partition=gpu",
        "--time=2-00:00:00",
        "--account=proj",
        "--qos=high",
        "--signal=B:USR1@600",
        f"--output={tmp_path}/runs/exp/slurm-%x-%j.out",
    ):
        assert opt in pretrain, (opt, pretrain)
    assert "data.device=cpu" not in pretrain
    # The evaluation: after the pretraining, on its (absolute) paths, cancelled if the dependency fails.
    env_part = [w for w in evaluate if w.startswith("UNMIX_")]
    assert env_part == ["UNMIX_LINEAR_ARGS=data.crop=32", "UNMIX_KNN_ARGS=data.crop=32"]
    cmd = evaluate[len(env_part) :]
    assert (
        cmd[0] == "sbatch"
        and "--dependency=afterok:PRETRAIN_JOB" in cmd
        and "--kill-on-invalid-dep=yes" in cmd
    )
    for opt in ("--nodes=1", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj"):
        assert opt in cmd, (opt, cmd)
    assert cmd[-4:] == [
        str(REPO / "slurm" / "linear.sbatch"),
        f"{tmp_path}/runs/exp",
        f"{tmp_path}/shards/train",
        f"{tmp_path}/shards/val",
    ]


def test_submit_dry_run_cpu(tmp_path):
    (tmp_path / "exp.yaml").write_text(CONFIG)
    out = _run(
        SUBMIT, "--dry-run", "--nodes", "2", "--cpu", "--signal-seconds", "120", "exp.yaml", cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    pretrain, evaluate = _commands(out.stdout)
    assert "--ntasks-per-node=1" in pretrain and "--signal=B:USR1@120" in pretrain
    assert not any(w.startswith("--gpus") for w in pretrain + evaluate)
    assert pretrain[-1] == "data.device=cpu"
    assert evaluate[:2] == [
        "UNMIX_LINEAR_ARGS=device=cpu data.crop=32",
        "UNMIX_KNN_ARGS=device=cpu data.crop=32",
    ]


def test_submit_refuses_a_bad_config_before_queueing(tmp_path):
    (tmp_path / "exp.yaml").write_text(CONFIG)
    out = _run(SUBMIT, "--dry-run", "exp.yaml", "optim.bogus=1", cwd=tmp_path)
    assert out.returncode == 2
    assert "optim.bogus" in out.stderr and "sbatch" not in out.stdout
    out = _run(SUBMIT, "--dry-run", "exp.yaml", "data.val=", cwd=tmp_path)
    assert out.returncode == 2 and "data.val is empty" in out.stderr
    out = _run(SUBMIT, "--dry-run", "--nodes", "zero", "exp.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "positive integer" in out.stderr
    out = _run(SUBMIT, "--dry-run", "-A", "proj", "exp.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "--name=value" in out.stderr
    out = _run(SUBMIT, "--dry-run", "--time", "9:00", "exp.yaml", cwd=tmp_path)  # 9 min < 600 s
    assert (
        out.returncode == 2 and "--signal-seconds 600 is not shorter than --time 9:00 (540 s)" in out.stderr
    )
    out = _run(SUBMIT, "--dry-run", "missing.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "missing.yaml does not exist" in out.stderr


def test_sweep_submits_unmix_off_and_on_per_seed(tmp_path):
    (tmp_path / "exp.yaml").write_text(CONFIG)
    out = _run(
        SWEEP,
        "--dry-run",
        "--seeds",
        "0 1",
        "--cpu",
        "--nodes",
        "2",
        "exp.yaml",
        "optim.epochs=5",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    pretrains = [c for c in cmds if str(REPO / "slurm" / "pretrain.sbatch") in c]
    evals = [c for c in cmds if str(REPO / "slurm" / "linear.sbatch") in c]
    assert len(pretrains) == len(evals) == 4
    runs = set()
    for cmd in pretrains:
        assert "--nodes=2" in cmd and "optim.epochs=5" in cmd and "data.device=cpu" in cmd
        enabled = next(w for w in cmd if w.startswith("unmix.enabled="))
        seed = next(w for w in cmd if w.startswith("seed="))
        out_dir = next(w for w in cmd if w.startswith("output_dir="))
        flag = "on" if enabled == "unmix.enabled=true" else "off"
        assert out_dir == f"output_dir={tmp_path}/runs/exp/unmix-{flag}-{seed.replace('=', '')}"
        runs.add((enabled, seed))
    assert runs == {(f"unmix.enabled={e}", f"seed={s}") for e in ("true", "false") for s in (0, 1)}
    # Every run's default MLflow store is the sweep directory's: one store, one experiment to compare.
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("compare when done: ") and shlex.split(last.split(": ", 1)[1]) == [
        "unmix",
        "compare",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/runs/exp/mlflow.db",
        "--experiment",
        "sweep-test",
    ]


def test_sweep_with_the_paper_cifar_config(tmp_path):
    """configs/cifar10_mocov2_sym_unmix.yaml through sweep.sh: one off/on pair, 32-px evaluation."""
    out = _run(SWEEP, "--dry-run", str(REPO / "configs" / "cifar10_mocov2_sym_unmix.yaml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cmds = _commands(out.stdout)
    pretrains = [c for c in cmds if str(REPO / "slurm" / "pretrain.sbatch") in c]
    evals = [c for c in cmds if str(REPO / "slurm" / "linear.sbatch") in c]
    assert len(pretrains) == len(evals) == 2
    assert {next(w for w in c if w.startswith("unmix.enabled=")) for c in pretrains} == {
        "unmix.enabled=true",
        "unmix.enabled=false",
    }
    assert all("UNMIX_KNN_ARGS=data.crop=32" in c for c in evals)
    assert all(str(tmp_path / "shards" / "cifar10" / "val") in c for c in evals)
    assert shlex.split(out.stdout.strip().splitlines()[-1])[-2:] == ["--experiment", "unmix-cifar10"]
