"""`unmix train` on several shard sets as one (``data.train: [labelled, unlabeled]``, STL-10's setting):
the data-fault checks cover every set, the epoch spans the union, the kNN bank is the labelled set, and a
run killed mid-epoch resumes to the same weights as a straight run."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
import yaml

from unmix.cli import main

TIMEOUT = 300
DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def two_sets(sample_train: Path, tmp_path_factory) -> tuple[Path, Path]:
    """24 labelled and 24 unlabeled digits (different images) as two shard sets: 6 steps of 8 per epoch."""
    from unmix.pipeline.shards import read_manifest, write_shards
    from unmix.pipeline.shards.sources import memory_source

    manifest = read_manifest(sample_train)
    images = []
    with tarfile.open(manifest.shards[0].path) as tar:
        members = {m.name: m for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg"))[:48]:
            key = name[: -len(".jpg")]
            label = int(tar.extractfile(members[key + ".cls"]).read().decode())
            images.append((f"{key}.jpg", tar.extractfile(members[name]).read(), label))
    root = tmp_path_factory.mktemp("union")
    for name, part, labeled in (("train", images[:24], True), ("unlabeled", images[24:], False)):
        write_shards(
            memory_source(name, part, manifest.classes),
            root / name,
            split=name,
            samples_per_shard=12,
            workers=1,
            progress=False,
            labeled=labeled,
        )
    return root / "train", root / "unlabeled"


def _config(tmp: Path, train, out: Path, **extra) -> Path:
    cfg = {
        "data": {"train": train, "device": "cpu", "crop": 16, "threads": 1},
        "model": {"arch": "resnet10", "width": 16},
        "method": {"name": "moco_v2", "moco": {"K": 64, "dim": 16, "hidden_dim": 32, "m": 0.9}},
        "unmix": {"enabled": True},
        "optim": {"epochs": 2, "batch_size": 8, "lr": 0.1},
        "deepspeed": {"precision": "fp32", "zero_stage": 0},
        "checkpoint": {"every_steps": 4, "every_epochs": 1, "keep": 2},
        "log": {"every_steps": 1, "progress": "lines"},
        "mlflow": {"experiment": "union", "system_metrics": False},
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


def _launch(config: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in DIST_KEYS}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.Popen(
        [sys.executable, "-m", "unmix.cli", "train", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.returncode, err


@pytest.mark.slow  # three `unmix train` launches: ~1 minute on two free cores
def test_run_over_two_sets_spans_the_union_and_resumes_exactly(two_sets, sample_val, tmp_path):
    train = [str(p) for p in two_sets]
    knn = {  # bank: the 24 labelled; the initial weights' kNN too (eval.knn_at_start)
        "data.val": str(sample_val), "eval.knn_every_epochs": 2, "eval.knn_k": 5, "eval.knn_at_start": True,
    }  # fmt: skip
    straight_out, resumed_out = tmp_path / "straight" / "run", tmp_path / "resumed" / "run"
    straight = _launch(_config(tmp_path, train, straight_out, **knn))

    cfg = _config(tmp_path, train, resumed_out, **knn)
    job = _launch(cfg)
    end = time.monotonic() + TIMEOUT
    while not (resumed_out / "checkpoints" / "step_00000004" / "COMPLETE").exists():  # mid-epoch 1
        assert job.poll() is None and time.monotonic() < end, job.stderr.read()[-3000:]
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait(TIMEOUT)
    rc, text = _finish(_launch(cfg))
    assert rc == 0, text[-3000:]
    assert "resumed from" in text and "step_00000004" in text
    assert "init knn top-1" not in text  # the floor belongs to step 0: a resumed run does not repeat it
    rc, straight_text = _finish(straight)
    assert rc == 0, straight_text[-3000:]
    # 48 images of both sets, batch 8: 6 steps per epoch, 12 in all
    assert "] step 6/12 epoch 1/2 " in straight_text and "] step 12/12 epoch 2/2 " in straight_text
    assert re.search(r"epoch 2 knn top-1 [\d.]+%", straight_text), straight_text[-2000:]
    assert straight_text.count("init knn top-1") == 1, straight_text[-2000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{straight_out.parent}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("union").experiment_id])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "knn_top1")] == [0, 12]

    def final(out: Path) -> dict:
        path = out / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt"
        return torch.load(path, map_location="cpu", weights_only=False)

    a, b = final(straight_out), final(resumed_out)
    for key in ("module", "optimizer", "method", "step", "epoch", "pos"):
        _assert_equal(a[key], b[key], key)  # online weights, SGD momentum, EMA target + queue, position
    sa = torch.load(straight_out / "backbone.pt")["state_dict"]
    sb = torch.load(resumed_out / "backbone.pt")["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _assert_equal(a, b, path: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"differs at {path}"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"keys differ at {path}"
        for k in a:
            _assert_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"differs at {path}: {a!r} != {b!r}"


def _error(tmp_path, monkeypatch, capsys, train, *overrides) -> str:
    monkeypatch.setattr("unmix.training.preemption.record_early", lambda: None)
    assert main(["train", str(_config(tmp_path, train, tmp_path / "runs" / "run")), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("unmix train: error: "), err
    assert not (tmp_path / "runs").exists()
    return err


def test_data_faults_of_any_set_exit_2_naming_it(two_sets, tmp_path, monkeypatch, capsys):
    good, unlabeled = two_sets
    broken = Path(shutil.copytree(unlabeled, tmp_path / "broken"))
    tar = broken / "unlabeled-000001.tar"
    tar.write_bytes(tar.read_bytes()[:-1024])
    err = _error(tmp_path, monkeypatch, capsys, [str(good), str(broken)])
    assert re.search(r"data.train\[1\]=.*broken: tar .*unlabeled-000001.tar does not match its manifest", err)
    err = _error(tmp_path, monkeypatch, capsys, [str(good), str(tmp_path / "nope")])
    assert "data.train[1]=" in err and "no such directory" in err
    err = _error(tmp_path, monkeypatch, capsys, [str(good), str(good / "manifest.json")])
    assert "data.train[1]" in err and "listed twice" in err
    err = _error(tmp_path, monkeypatch, capsys, [])
    assert "data.train: invalid value []" in err
    err = _error(tmp_path, monkeypatch, capsys, [str(good), 3])
    assert "data.train: invalid value" in err
    # no labelled set: the kNN monitor would have no bank; said before anything starts
    err = _error(
        tmp_path, monkeypatch, capsys, [str(unlabeled)], f"data.val={good}", "eval.knn_every_epochs=1"
    )
    assert "no shard set has labels" in err
