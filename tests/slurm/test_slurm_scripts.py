"""slurm/submit.sh, pretrain.sbatch and linear.sbatch on a real two-node Slurm cluster (CPU processes).

Three submissions run side by side (so the module costs about as long as its slowest scenario). The
requeue test comes first: its job may start at once and takes well under a minute, so a test before it
that waits for another job would let it finish before it is ever interrupted.

- ``happy``: ``submit.sh --nodes 2 --tasks-per-node 1 --cpu``: the pretraining spans node1 and node2
  (ranks 0 and 1, MLflow ``world_size`` = 2), the evaluation starts only after it succeeded and logs
  ``linear_top1`` onto the pretraining run.
- ``requeue``: the same, interrupted twice while training: ``scancel --signal=USR1 --batch`` (the batch
  script forwards USR1, the ranks checkpoint and exit 75, the script requeues the job) and
  ``scontrol requeue`` (Slurm's SIGTERM, the ranks checkpoint, Slurm requeues). Each time the job comes
  back, resumes from the checkpoint, and the MLflow run is the same one with steps that never restart.
- ``bad``: a config that passes submission but fails at start (global batch not divisible by the world
  size): the pretraining fails and Slurm cancels the evaluation through the dependency; it never runs.

Slurm holds a requeued job for about two minutes (its BeginTime) before starting it again; the test
releases it at once with ``scontrol update JobId=... StartTime=now``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
SUBMIT = REPO / "slurm" / "submit.sh"
VENV = Path(sys.prefix)

# Small enough for two CPU processes on two shared cores; the digits sample at 32x32.
TINY_CONFIG = """\
data: {device: cpu, crop: 32, threads: 1}
model: {arch: resnet10, width: 16}
method: {name: moco_v2, moco: {K: 128, m: 0.99, dim: 32, hidden_dim: 64}}
unmix: {enabled: true}
optim: {epochs: 1, batch_size: 32, lr: 0.06}
mlflow: {experiment: slurm-test, system_metrics: false}
deepspeed: {precision: fp32, zero_stage: 0}
checkpoint: {every_epochs: 1, keep: 2}
log: {every_steps: 1, progress: lines}
"""
EVAL_ARGS = {
    "UNMIX_LINEAR_ARGS": "epochs=2 features=cached batch_size=128",
    "UNMIX_KNN_ARGS": "batch_size=128",
}
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}

STEP_LINE = re.compile(r"\[unmix\] step (\d+)/(\d+)")
RESUMED_LINE = re.compile(r"\[unmix\] resumed from \S+ \(step (\d+)")


@dataclass
class Submission:
    pretrain: str
    evaluate: str
    output_dir: Path
    tracking_uri: str

    def log(self, job: str) -> Path:
        name = "unmix-pretrain" if job == self.pretrain else "unmix-eval"
        return self.output_dir / f"slurm-{name}-{job}.out"

    def pretrain_log(self) -> str:
        path = self.log(self.pretrain)
        return path.read_text(errors="replace") if path.exists() else ""


def submit(cluster, workdir: Path, *overrides: str, extra_env: dict[str, str] | None = None):
    """Start submit.sh in ``workdir`` (2 nodes x 1 CPU task); :func:`parse` reads the two job ids."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "tiny.yaml"
    config.write_text(TINY_CONFIG)
    env = {"UNMIX_VENV": str(VENV), "DS_ACCELERATOR": "cpu", **EVAL_ARGS, **(extra_env or {})}
    cmd = [
        str(SUBMIT),
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--cpu",
        "--cpus-per-task",
        "1",
        "--time",
        "60",  # minutes; --signal=B:USR1@600 would otherwise checkpoint-and-requeue it mid-test
        str(config),
        f"output_dir={workdir / 'run'}",
        *overrides,
    ]
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=cluster.env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return workdir, proc


def parse(workdir: Path, proc: subprocess.Popen) -> Submission:
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 0, f"submit.sh failed ({proc.returncode}):\n{stdout}\n{stderr}"
    pretrain = re.search(r"^pretrain job (\d+)", stdout, re.M)
    evaluate = re.search(r"^eval job (\d+)", stdout, re.M)
    assert pretrain and evaluate, stdout
    return Submission(
        pretrain.group(1), evaluate.group(1), workdir / "run", f"sqlite:///{workdir / 'mlflow.db'}"
    )


@pytest.fixture(scope="module")
def submissions(slurm_cluster, sample_train, sample_val, tmp_path_factory):
    """All three scenarios submitted at once (submit.sh runs in parallel); the tests wait for their own."""
    root = tmp_path_factory.mktemp("slurm-jobs")
    data = [f"data.train={sample_train}", f"data.val={sample_val}"]
    started = {
        "bad": submit(slurm_cluster, root / "bad", *data, "optim.batch_size=33"),
        "happy": submit(slurm_cluster, root / "happy", *data),
        # Pretrains on the small val split (11 steps an epoch) for 6 epochs, so that the second requeue
        # (one step after the first resume) lands mid-run on a fast machine too; only kNN afterwards.
        "requeue": submit(
            slurm_cluster,
            root / "requeue",
            f"data.train={sample_val}",
            f"data.val={sample_val}",
            "optim.epochs=6",
            "unmix.enabled=false",
            extra_env={"UNMIX_EVAL": "knn"},
        ),
    }
    try:
        return {name: parse(*s) for name, s in started.items()}
    finally:
        for _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _pretrain_run(tracking_uri: str):
    """The MLflow client and the pretraining runs of the experiment (evaluation runs point to theirs)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name("slurm-test")
    assert exp is not None, f"no MLflow experiment 'slurm-test' in {tracking_uri}"
    runs = client.search_runs([exp.experiment_id])
    pretrain = [r for r in runs if "unmix.pretrain_run_id" not in r.data.tags]
    for r in runs:
        if r not in pretrain:  # every evaluation run is linked to the one pretraining run
            assert [r.data.tags["unmix.pretrain_run_id"]] == [p.info.run_id for p in pretrain], r.data.tags
    return client, pretrain


def _times(cluster, job: str) -> tuple[str, str]:
    rec = cluster.job(job)
    return rec.get("StartTime", ""), rec.get("EndTime", "")


def _wait_for_log(sub: Submission, pattern: re.Pattern, count: int, timeout: float, cluster) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(pattern.finditer(sub.pretrain_log()))
        if len(found) >= count:
            return found
        state = cluster.state(sub.pretrain)
        log = cluster.tail(sub.log(sub.pretrain))
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n{log}"
        time.sleep(1)
    raise AssertionError(
        f"no {pattern.pattern!r} x{count} in {timeout}s\n{cluster.tail(sub.log(sub.pretrain))}"
    )


def _comes_back(cluster, sub: Submission, restarts: int) -> None:
    """Wait until the job is pending again after its ``restarts``-th requeue, then release it.

    Slurm would hold it for about two minutes; releasing it at once is only safe once the previous
    instance is gone from the nodes (slurmd refuses to launch a job id it still runs).
    """
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rec = cluster.job(sub.pretrain)
        pending = rec.get("JobState") == "PENDING" and int(rec.get("Restarts", 0)) >= restarts
        if pending and not cluster.job_processes(sub.pretrain):
            # The evaluation still waits: a requeue is not a success.
            assert cluster.state(sub.evaluate) == "PENDING"
            time.sleep(1)
            cluster.run("scontrol", "update", f"JobId={sub.pretrain}", "StartTime=now")
            return
        assert rec.get("JobState") in ("RUNNING", "COMPLETING", "PENDING", "REQUEUED"), rec
        time.sleep(0.5)
    log = cluster.tail(sub.log(sub.pretrain))
    raise AssertionError(f"job not requeued:\n{cluster.job(sub.pretrain)}\n{log}")


def test_requeue_resumes_the_same_run(slurm_cluster, submissions):
    sub = submissions["requeue"]
    # 1) USR1 to the batch shell, as --signal=B:USR1@N does before the time limit.
    *_, last = _wait_for_log(sub, STEP_LINE, 1, 600, slurm_cluster)
    assert int(last.group(1)) < int(last.group(2)), f"the job trained to the end before the test: {last[0]}"
    assert slurm_cluster.state(sub.pretrain) == "RUNNING", slurm_cluster.job(sub.pretrain)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", sub.pretrain)
    _comes_back(slurm_cluster, sub, restarts=1)
    first = _wait_for_log(sub, RESUMED_LINE, 1, 300, slurm_cluster)
    # 2) scontrol requeue from outside: SIGTERM to the tasks, Slurm requeues.
    steps_before = len(STEP_LINE.findall(sub.pretrain_log()))
    *_, last = _wait_for_log(sub, STEP_LINE, steps_before + 1, 300, slurm_cluster)
    assert int(last.group(1)) < int(last.group(2)), f"trained to the end before the requeue: {last[0]}"
    slurm_cluster.run("scontrol", "requeue", sub.pretrain)
    _comes_back(slurm_cluster, sub, restarts=2)
    resumed = _wait_for_log(sub, RESUMED_LINE, 2, 300, slurm_cluster)
    state = slurm_cluster.wait_state(sub.pretrain, ENDED, 600, sub.log(sub.pretrain))
    text = sub.pretrain_log()
    assert state == "COMPLETED", slurm_cluster.tail(sub.log(sub.pretrain))
    assert "unmix: checkpointed after USR1; requeueing job" in text
    assert text.count("unmix: srun exited with 75") == 2, text

    # Each restart resumed from a later checkpoint than the previous one, and never from scratch.
    resumed_steps = [int(m.group(1)) for m in resumed]
    assert int(first[0].group(1)) == resumed_steps[0] > 0
    assert resumed_steps[1] > resumed_steps[0], resumed_steps
    assert (sub.output_dir / "backbone.pt").exists()
    # Slurm's own record: two requeues (recorded as PENDING ends), then the completed run.
    states = [r["JobState"] for r in slurm_cluster.jobcomp(sub.pretrain)]
    assert states == ["PENDING", "PENDING", "COMPLETED"], states

    # One MLflow run; its loss steps only ever increase and cover the whole run once.
    client, runs = _pretrain_run(sub.tracking_uri)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    history = client.get_metric_history(runs[0].info.run_id, "loss")
    history = sorted(history, key=lambda m: (m.timestamp, m.step))
    steps = [m.step for m in history]
    assert steps == sorted(set(steps)), steps
    total = int(STEP_LINE.findall(text)[-1][1])
    assert steps[-1] == total and steps == list(range(1, total + 1)), steps
    # The requeued job's evaluation ran only after the final success.
    state = slurm_cluster.wait_state(sub.evaluate, ENDED, 300, sub.log(sub.evaluate))
    assert state == "COMPLETED", slurm_cluster.tail(sub.log(sub.evaluate))


def test_bad_config_cancels_the_evaluation(slurm_cluster, submissions):
    sub = submissions["bad"]
    state = slurm_cluster.wait_state(sub.pretrain, ENDED, 240, sub.log(sub.pretrain))
    assert state == "FAILED", slurm_cluster.tail(sub.log(sub.pretrain))
    assert "optim.batch_size" in sub.pretrain_log()  # the trainer's error names the key
    assert slurm_cluster.wait_state(sub.evaluate, ENDED | {"RUNNING"}, 60) == "CANCELLED"
    rec = slurm_cluster.job(sub.evaluate)
    assert rec.get("Reason") == "DependencyNeverSatisfied", rec
    # It never ran: no node was ever allocated and no batch script wrote its log.
    assert rec.get("NodeList") in ("", "(null)") and "BatchHost" not in rec, rec
    assert not sub.log(sub.evaluate).exists(), "the evaluation ran"
    [record] = slurm_cluster.jobcomp(sub.evaluate)
    assert record["JobState"] == "CANCELLED" and record["NodeCnt"] == "0", record


def test_two_nodes_then_dependent_evaluation(slurm_cluster, submissions):
    sub = submissions["happy"]
    log = sub.log(sub.pretrain)
    # The evaluation waits on the dependency for as long as the pretraining has not succeeded.
    deadline = time.monotonic() + 600
    while slurm_cluster.state(sub.pretrain) in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING"):
        assert slurm_cluster.state(sub.evaluate) == "PENDING", slurm_cluster.job(sub.evaluate)
        assert time.monotonic() < deadline, slurm_cluster.tail(log)
        time.sleep(2)
    assert slurm_cluster.state(sub.pretrain) == "COMPLETED", slurm_cluster.tail(log)
    text = sub.pretrain_log()
    assert "unmix: rank 0/2 local 0 on node1" in text and "unmix: rank 1/2 local 0 on node2" in text, text
    assert (sub.output_dir / "backbone.pt").exists()

    state = slurm_cluster.wait_state(sub.evaluate, ENDED, 400, sub.log(sub.evaluate))
    assert state == "COMPLETED", slurm_cluster.tail(sub.log(sub.evaluate))
    assert _times(slurm_cluster, sub.evaluate)[0] >= _times(slurm_cluster, sub.pretrain)[1]  # ISO times
    linear, logreg = (
        json.loads((sub.output_dir / "eval" / f"{k}.json").read_text()) for k in ("linear", "logreg")
    )
    assert (linear["protocol"], logreg["protocol"]) == ("moco", "logreg")  # the SGD probe, then the reference
    assert (sub.output_dir / "eval" / "knn.json").exists()

    client, runs = _pretrain_run(sub.tracking_uri)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.data.params["world_size"] == "2"
    assert "linear_top1" in run.data.metrics and "knn_top1" in run.data.metrics, run.data.metrics
    assert 0.0 <= run.data.metrics["linear_top1"] <= 100.0
