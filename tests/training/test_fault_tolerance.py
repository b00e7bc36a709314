"""Fault tolerance end to end with `unmix train` on tiny real shards (48 digits, 6 steps per epoch, CPU fp32):
SIGKILL and SIGTERM mid-epoch then resume == an uninterrupted run, bitwise, in one MLflow run; SIGUSR1 to
one of two ranks; a corrupted latest checkpoint; a non-finite loss; a config change refused on resume."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

STEPS_PER_EPOCH = 6  # 48 images, batch 8
TIMEOUT = 300

DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def tiny_train(sample_train: Path, tmp_path_factory) -> Path:
    """48 images of the digits sample as their own shard set."""
    from unmix.pipeline.shards import read_manifest, write_shards
    from unmix.pipeline.shards.sources import memory_source

    manifest = read_manifest(sample_train)
    images = []
    with tarfile.open(manifest.shards[0].path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg"))[:48]:
            key = name[: -len(".jpg")]
            label = int(tar.extractfile(members[key + ".cls"]).read().decode())
            images.append(
                (f"{manifest.classes[label]}/{key}.jpg", tar.extractfile(members[name]).read(), label)
            )
    out = tmp_path_factory.mktemp("tiny") / "train"
    write_shards(
        memory_source("tiny", images, manifest.classes),
        out,
        split="train",
        samples_per_shard=24,
        workers=1,
        progress=False,
    )
    return out


def _config(tmp: Path, train: Path, out: Path, **extra) -> Path:
    cfg = {
        "data": {"train": str(train), "device": "cpu", "crop": 16, "threads": 1},
        "model": {"arch": "resnet10", "width": 16},
        "method": {"name": "moco_v2", "moco": {"K": 64, "dim": 16, "hidden_dim": 32, "m": 0.9}},
        "unmix": {"enabled": True},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.1},
        "deepspeed": {"precision": "fp32", "zero_stage": 0},
        "checkpoint": {"every_steps": 4, "every_epochs": 1, "keep": 2},
        "log": {"every_steps": 1, "progress": "lines"},
        "mlflow": {"experiment": "ft", "system_metrics": False},
        "output_dir": str(out),
    }
    for key, value in extra.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp / f"{out.parent.name}_{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Job:
    """`unmix train` as a subprocess whose stderr is collected line by line."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        # A rendezvous left in this process's environment (by an in-process test) must not leak into
        # the job: a single-process job picks its own free port.
        inherited = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
        full_env = {**inherited, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unmix.cli", "train", str(config), *args],
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, predicate, timeout: float = TIMEOUT) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode} early:\n{self.text[-4000:]}")
            time.sleep(0.05)
        self.proc.kill()
        raise AssertionError(f"timed out:\n{self.text[-4000:]}")

    def logged_step(self, n: int) -> bool:
        return any(f"] step {n}/" in line for line in self.lines)

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(10)
        return rc

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _final_state(out: Path, step: int) -> dict:
    return torch.load(
        out / "checkpoints" / f"step_{step:08d}" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )


def _assert_bitwise(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}: {set(a) ^ set(b)}"
        for k in a:
            _assert_bitwise(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_bitwise(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a!r} != {b!r}"


def _metric_history(out: Path, key: str = "loss") -> tuple[str, list[tuple[int, float]]]:
    import mlflow

    meta = torch.load(out / "backbone.pt", weights_only=False)["meta"]
    client = mlflow.MlflowClient(tracking_uri=meta["mlflow_tracking_uri"])
    hist = sorted(client.get_metric_history(meta["mlflow_run_id"], key), key=lambda m: (m.step, m.timestamp))
    return meta["mlflow_run_id"], [(m.step, m.value) for m in hist]


@pytest.mark.slow  # six `unmix train` launches: ~1-2 minutes on two free cores
def test_sigkill_and_sigterm_then_resume_equal_straight_run(tiny_train, sample_val, tmp_path):
    total = 2 * STEPS_PER_EPOCH
    straight_out, resumed_out = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    knn = {"data.val": str(sample_val), "eval.knn_every_epochs": 1, "eval.knn_k": 20}  # the kNN monitor on
    straight = Job(_config(tmp_path, tiny_train, straight_out, **knn))  # runs alongside the interrupted one

    # 1. SIGKILL right after the checkpoint at step 4 (mid-epoch 1) is complete.
    cfg = _config(tmp_path, tiny_train, resumed_out, **knn)
    job = Job(cfg)
    job.wait_for(lambda: (resumed_out / "checkpoints" / "step_00000004" / "COMPLETE").exists())
    job.proc.send_signal(signal.SIGKILL)
    assert job.finish() == -signal.SIGKILL

    # 2. Resume; SIGTERM mid-epoch 2: finishes the step, checkpoints, exits 75.
    job = Job(cfg)
    job.wait_for(lambda: job.logged_step(8))
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 75, job.text[-3000:]
    assert "resumed from" in job.text and "step_00000004" in job.text
    stopped_at = int((resumed_out / "checkpoints" / "latest").read_text().split("_")[1])
    assert 8 <= stopped_at < total and stopped_at != STEPS_PER_EPOCH

    # 3. Resume to the end.
    job = Job(cfg)
    assert job.finish() == 0, job.text[-3000:]
    assert straight.finish() == 0, straight.text[-3000:]
    steps = [line for line in straight.lines if "] step " in line]  # log.every_steps=1, 6 steps per epoch
    assert "] step 1/12 epoch 1/2 " in steps[0] and "] step 6/12 epoch 1/2 " in steps[5], steps
    assert "] step 7/12 epoch 2/2 " in steps[6] and "] step 12/12 epoch 2/2 " in steps[-1], steps

    a, b = _final_state(straight_out, total), _final_state(resumed_out, total)
    for key in ("module", "optimizer", "method", "step", "epoch", "pos"):
        _assert_bitwise(a[key], b[key], key)  # online weights, SGD momentum, EMA target + queue
    _assert_bitwise(
        torch.load(straight_out / "backbone.pt")["state_dict"],
        torch.load(resumed_out / "backbone.pt")["state_dict"],
    )

    # One MLflow run; metric steps continue: each step logged once, values equal the straight run's.
    run_id, hist = _metric_history(resumed_out)
    assert [s for s, _ in hist] == list(range(1, total + 1)), hist
    assert hist == _metric_history(straight_out)[1]
    # The kNN monitor: after each epoch, at its last step; the resumed run's values equal the straight one's.
    _, knn_hist = _metric_history(straight_out, "knn_top1")
    assert [s for s, _ in knn_hist] == [STEPS_PER_EPOCH, total], knn_hist
    assert all(0 <= v <= 100 for _, v in knn_hist) and _metric_history(resumed_out, "knn_top1")[1] == knn_hist
    assert "epoch 2 knn top-1" in straight.text and "359 val images" in straight.text
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{resumed_out.parent}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert [r.info.run_id for r in client.search_runs(experiments)] == [run_id]

    # Corrupted latest checkpoint: falls back to the previous one (with a warning naming the skipped one);
    # raising optim.epochs extends the finished run.
    ckpt = resumed_out / "checkpoints"
    kept = sorted(p.name for p in ckpt.glob("step_*"))
    assert len(kept) == 2 and kept[1] == "step_00000012", kept  # keep: 2
    states = ckpt / "step_00000012" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[: states.stat().st_size // 2])
    job = Job(cfg, "optim.epochs=3")
    assert job.finish() == 0, job.text[-3000:]
    assert "skipped checkpoint(s) step_00000012: truncated file mp_rank_00_model_states.pt" in job.text
    assert f"resuming from {kept[0]}" in job.text
    assert (ckpt / "step_00000018" / "COMPLETE").exists()
    assert torch.load(resumed_out / "backbone.pt")["meta"]["epochs"] == 3

    # A change that would alter the run is refused, naming the key.
    job = Job(cfg, "optim.epochs=3", "optim.lr=0.5")
    assert job.finish() == 2
    assert "optim.lr (0.1 -> 0.5)" in job.text and "--force-config" in job.text


def test_nonfinite_loss_names_step_and_keeps_last_good_checkpoint(tiny_train, tmp_path):
    from unmix.training.checkpoint import verify

    out = tmp_path / "nan" / "run"
    job = Job(_config(tmp_path, tiny_train, out, **{"optim.lr": 1e38, "checkpoint.every_steps": 1}))
    assert job.finish() == 1, job.text[-3000:]
    assert "non-finite loss at step " in job.text
    bad = int(job.text.split("non-finite loss at step ")[1].split()[0])
    diag = out / "checkpoints" / f"nonfinite_step_{bad:08d}.json"
    info = json.loads(diag.read_text())
    assert info["step"] == bad and info["last_good_checkpoint"] == f"step_{bad - 1:08d}"
    assert verify(out / "checkpoints" / info["last_good_checkpoint"]) is None  # intact
    assert not (out / "checkpoints" / f"step_{bad:08d}").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigusr1_to_one_of_two_ranks_checkpoints_both(tiny_train, tmp_path):
    from unmix.training.checkpoint import verify

    out = tmp_path / "usr1" / "run"
    cfg = _config(tmp_path, tiny_train, out, **{"checkpoint.every_steps": 0})
    port = str(_free_port())
    jobs = [
        Job(
            cfg,
            env={
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        for r in range(2)
    ]
    jobs[0].wait_for(lambda: jobs[0].logged_step(2))
    jobs[1].proc.send_signal(signal.SIGUSR1)
    codes = [j.finish() for j in jobs]
    assert codes == [75, 75], jobs[0].text[-2000:] + jobs[1].text[-2000:]
    latest = (out / "checkpoints" / "latest").read_text()
    record = json.loads((out / "checkpoints" / latest / "COMPLETE").read_text())
    assert record["world_size"] == 2 and verify(out / "checkpoints" / latest) is None
    assert {"rank0_state.pt", "rank1_state.pt"} <= set(record["files"])

    # Resuming it with another number of processes is refused (each rank's data position is its shard's).
    job = Job(cfg)
    assert job.finish() == 2
    assert "written by 2 process(es), this job has 1" in job.text


def _catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def test_sigusr1_during_startup_checkpoints_after_the_first_step(tiny_train, tmp_path):
    out = tmp_path / "early" / "run"
    job = Job(_config(tmp_path, tiny_train, out))
    # As soon as the early handler is in place (before torch loads), long before training starts.
    job.wait_for(lambda: _catches(job.proc.pid, signal.SIGUSR1), timeout=60)
    job.proc.send_signal(signal.SIGUSR1)
    assert job.finish() == 75, job.text[-3000:]
    assert "received SIGUSR1 during start-up" in job.text, job.text[-3000:]
    assert job.logged_step(1) and not job.logged_step(2), job.text[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert (out / "checkpoints" / "step_00000001" / "COMPLETE").exists()
