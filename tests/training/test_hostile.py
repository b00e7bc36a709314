"""Hostile and damaged inputs, training side. Each test builds its input and asserts the outcome:
refused with exit status 2 and one line naming the file/key/value, nothing in it run, nothing good deleted.

Items: 1 (checkpoint files holding code), 4 (pruning by verified checkpoints), 9 (config numbers),
10 (tracking URIs without credentials), 12 (deepspeed.config pass-through, YAML bombs), 13 (atomic writes,
disk full, read-only output_dir, malformed COMPLETE). The mount-namespace tests (a real full or read-only
file system) need ``unshare -m`` (root, as in CI).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest
import torch
import yaml

import unmix
from unmix.training import atomic, checkpoint, safe_load
from unmix.training.checkpoint_state import FORMAT_VERSION, ClientState
from unmix.training.config import NUMBER_RANGES, Config, ConfigError, load_config
from unmix.training.tracking import without_credentials

TIMEOUT = 600
DIST_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

# A run small enough for the CPU: synthetic images, 4 steps per epoch, one checkpoint per epoch.
TINY = {
    "data": {"source": "synthetic", "device": "cpu", "crop": 16, "threads": 1, "synthetic_samples": 32},
    "model": {"arch": "resnet10", "width": 16},
    "method": {"name": "moco_v2", "moco": {"K": 64, "dim": 16, "hidden_dim": 32}},
    "optim": {"epochs": 1, "batch_size": 8, "lr": 0.1},
    "deepspeed": {"precision": "fp32", "zero_stage": 0},
    "checkpoint": {"every_epochs": 1, "keep": 2},
    "log": {"every_steps": 1, "progress": "lines"},
    "mlflow": {"enabled": False},
}


class RunsCode:
    """Unpickling this calls ``os.system`` (pickled as ``posix.system``): it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _env() -> dict[str, str]:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    for key in DIST_KEYS:
        env.pop(key, None)
    return env


def _train(config: Path, *overrides: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "unmix", "train", str(config), *overrides],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line error: the last line of stderr, with no traceback anywhere."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("unmix train: error: "), proc.stderr[-3000:]
    return line


def _write_config(path: Path, output_dir: Path, **overrides) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["output_dir"] = str(output_dir)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished one-epoch run (real DeepSpeed files): ``<dir>/run/checkpoints/step_00000004``."""
    root = tmp_path_factory.mktemp("hostile")
    proc = _train(_write_config(root / "c.yaml", root / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


def _copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


def _rehash(path: Path) -> None:
    """What an attacker who also rewrites COMPLETE does: record the tampered files' sizes and hashes."""
    record = json.loads((path / checkpoint.COMPLETE).read_text())
    for name in record["files"]:
        f = path / name
        record["files"][name] = [f.stat().st_size, checkpoint._sha256(f)]
    (path / checkpoint.COMPLETE).write_text(json.dumps(record))


def _namespace_or_skip() -> None:
    """Skip unless this process may make a private mount namespace (root, as in CI)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-m", "true"]).returncode != 0:
        pytest.skip("needs `unshare -m` (root) for a real full / read-only file system")


# ------------------------------------------------------------------------ item 1: checkpoints hold code


def test_item1_rank_state_with_code_is_refused_on_resume_and_nothing_runs(trained, tmp_path):
    """A ``rank0_state.pt`` carrying an ``os.system`` payload, with a matching COMPLETE: `unmix train`
    refuses to resume (exit 2, one line naming the file and the global); the payload never runs."""
    run = _copy_run(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "ran"
    torch.save({"rng": RunsCode(marker), "loader": {}}, ckpt / "rank0_state.pt")
    _rehash(ckpt)
    assert checkpoint.verify(ckpt) is None  # the hashes match: only the content check can stop it
    proc = _train(_write_config(tmp_path / "c.yaml", run, **{"optim.epochs": 2}))
    line = _error_line(proc)
    assert f"{ckpt / 'rank0_state.pt'}: refused: it holds code (global posix.system)" in line
    assert not marker.exists()
    assert ckpt.is_dir() and not (ckpt.parent / "step_00000008").exists()  # nothing deleted, no training


def test_item1_deepspeed_file_with_code_is_refused_before_deepspeed_loads(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "ran"
    states = ckpt / "mp_rank_00_model_states.pt"
    good = torch.load(states, weights_only=False)  # our own file, trusted here
    torch.save({**good, "lr_scheduler": RunsCode(marker)}, states)
    _rehash(ckpt)
    with pytest.raises(checkpoint.ResumeError) as exc:
        checkpoint.find_resumable(run / "checkpoints", 1)
    assert f"{states}: refused: it holds code (global posix.system)" in str(exc.value)
    assert not marker.exists()
    # and DeepSpeed's own torch.load (weights_only=False in its source) is forced weights-only as well
    with safe_load.deepspeed_loads(), pytest.raises(Exception, match="posix.system"):
        torch.load(states, weights_only=False)
    assert not marker.exists()


def test_item1_our_files_load_weights_only_and_the_rng_states_round_trip(trained):
    import random

    import numpy as np

    ckpt = trained / "checkpoints" / "step_00000004"
    assert checkpoint.check_files(ckpt) is None  # every file of a real checkpoint passes
    state = torch.load(ckpt / "rank0_state.pt", weights_only=True)  # no allow-list needed at all
    assert set(state) >= {"rng", "loader"}
    saved = _roundtrip(checkpoint.rng_state())
    first = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(torch.load(saved, weights_only=True))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and (first[1] == again[1]).all() and first[2] == again[2]


def _roundtrip(obj) -> object:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


DS_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch, deepspeed
    from torch import nn
    from unmix.training import safe_load
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = sys.argv[2]
    deepspeed.init_distributed("gloo")
    for stage in (0, 1, 2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        cfg = {"train_batch_size": 4, "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
               "zero_optimization": {"stage": stage}, "steps_per_print": 10**9}
        eng, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        loss = eng(torch.randn(4, 4)).sum(); eng.backward(loss); eng.step()
        eng.save_checkpoint(sys.argv[1], tag=f"s{stage}", client_state={"x": 1}, save_latest=False)
        files = sorted(os.listdir(os.path.join(sys.argv[1], f"s{stage}")))
        for name in files:
            safe_load.check_file(os.path.join(sys.argv[1], f"s{stage}", name))
        with safe_load.deepspeed_loads():
            path, client = eng.load_checkpoint(sys.argv[1], tag=f"s{stage}", load_optimizer_states=True)
        assert path is not None and client["x"] == 1
        print("ZERO", stage, "OK", ",".join(files), flush=True)
    """
)


def test_item1_allow_list_covers_deepspeed_zero_0_1_2(tmp_path):
    """The allow-list is exactly enough for DeepSpeed's own files at ZeRO 0, 1 and 2 (CPU, fp32): each file
    passes the check and the engine loads it with every torch.load forced weights-only."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ds.py"
    script.write_text(DS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck"), str(port)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    oks = [line for line in proc.stdout.splitlines() if line.startswith("ZERO")]
    assert [line.split()[1] for line in oks] == ["0", "1", "2"]
    assert "optim_states" in oks[1] and "optim_states" in oks[2]  # the ZeRO files with DeepSpeed classes


# ------------------------------------------------------------------------ versioned checkpoint format


def _as_version_1(ckpt: Path) -> None:
    """Rewrite checkpoint ``ckpt`` as the unversioned layout wrote it: no ``format_version`` and no
    ``written_by`` in the client state or in COMPLETE, every other byte of state as it was."""
    states = ckpt / "mp_rank_00_model_states.pt"
    saved = torch.load(states, weights_only=False)  # our own file, trusted here
    record = json.loads((ckpt / checkpoint.COMPLETE).read_text())
    for d in (saved, record):
        del d["format_version"], d["written_by"]
    torch.save(saved, states)
    (ckpt / checkpoint.COMPLETE).write_text(json.dumps(record))
    _rehash(ckpt)


def test_unversioned_checkpoint_is_migrated_and_resumes_exactly_as_the_versioned_one(trained, tmp_path):
    versioned, old = _copy_run(trained, tmp_path / "v2"), _copy_run(trained, tmp_path / "v1")
    _as_version_1(old / "checkpoints" / "step_00000004")
    for run in (versioned, old):
        proc = _train(_write_config(tmp_path / f"{run.name}.yaml", run, **{"optim.epochs": 2}))
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from {run / 'checkpoints' / 'step_00000004'} (step 4, epoch 1," in proc.stderr
    a, b = (torch.load(r / "backbone.pt", weights_only=True)["state_dict"] for r in (versioned, old))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    record = json.loads((old / "checkpoints" / "step_00000008" / checkpoint.COMPLETE).read_text())
    assert record["format_version"] == FORMAT_VERSION  # the resumed run writes the current format


def test_checkpoint_of_a_newer_format_is_refused_in_one_line_before_any_work(trained, tmp_path):
    run = _copy_run(trained, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_00000004"
    record = json.loads((ckpt / checkpoint.COMPLETE).read_text())
    record.update(format_version=FORMAT_VERSION + 1, written_by="9.0")
    (ckpt / checkpoint.COMPLETE).write_text(json.dumps(record))
    proc = _train(_write_config(tmp_path / "c.yaml", run, **{"optim.epochs": 2}))
    assert _error_line(proc) == (
        f"unmix train: error: {ckpt}: checkpoint format version 3 (written by unmix 9.0) is newer than this "
        f"unmix ({unmix.__version__}) reads (1 to 2); resume with the unmix version that wrote it, or start "
        "a new output_dir"
    )
    assert sorted(p.name for p in ckpt.parent.iterdir() if p.is_dir()) == [ckpt.name]  # nothing touched


# --------------------------------------------------------------------- item 4: prune by verified only


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would: one model-states file holding the client state."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(1000)}, **client_state}, path / "mp_rank_00_model_states.pt")


def _save(ckpt: Path, step: int, keep: int) -> Path:
    client = ClientState(step=step, epoch=0, pos=step, config={}, method={}, mlflow_run_id=None)
    return checkpoint.save(FakeEngine(), ckpt, client, {"loader": {"pos": step}}, keep)


def test_item4_resumed_checkpoint_survives_until_a_newer_verified_one(tmp_path):
    """keep=1, a good step 2 and a newer step 6 with COMPLETE but a damaged file: the run resumes from step
    2; saving step 4 keeps step 4 (the damaged step 6 used to fill the quota, so step 4 and step 2 were both
    deleted and a kill restarted from scratch); step 2 goes only once step 4 is verified."""
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 2, keep=1)
    # a newer checkpoint whose COMPLETE exists but whose file is damaged (e.g. a disk error after saving)
    bad = ckpt / "step_00000006"
    shutil.copytree(ckpt / "step_00000002", bad)
    record = json.loads((bad / checkpoint.COMPLETE).read_text())
    record["step"] = 6
    (bad / checkpoint.COMPLETE).write_text(json.dumps(record))
    (bad / "rank0_state.pt").write_bytes(b"damaged")
    checkpoint._intact.clear()
    with pytest.warns(UserWarning, match="step_00000006: truncated file rank0_state.pt"):
        assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000002"
    checkpoint.prune(ckpt, keep=1)  # the damaged step 6 does not count: step 2 stays
    assert (ckpt / "step_00000002").is_dir()
    _save(ckpt, 4, keep=1)  # a newer verified checkpoint: kept; it now replaces step 2
    assert (ckpt / "step_00000004" / checkpoint.COMPLETE).exists()
    assert not (ckpt / "step_00000002").exists()
    checkpoint._intact.clear()
    with pytest.warns(UserWarning, match="step_00000006"):
        assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000004"


# ----------------------------------------------------------------------------- item 9: config numbers


@pytest.mark.parametrize(
    "override, needle",
    [
        ("method.moco.T=.inf", "method.moco.T: invalid value inf; must be a finite number"),
        ("eval.knn_t=.nan", "eval.knn_t: invalid value nan; must be a finite number"),
        ("optim.lr=.nan", "optim.lr: invalid value nan; must be a finite number"),
        ("optim.warmup_epochs=.inf", "optim.warmup_epochs: invalid value inf; must be a finite number"),
        ("unmix.alpha=.nan", "unmix.alpha: invalid value nan; must be a finite number"),
        ("seed=-1", "seed: invalid value -1; must be in [0, 2147483647]"),
        ("method.moco.K=1000000000000", "method.moco.K: invalid value 1000000000000; must be > 0 and <="),
        ("method.moco.K=1e12", "method.moco.K: invalid value '1e12'; expected an integer"),
        ("method.moco.m=-0.5", "method.moco.m: invalid value -0.5; must be in [0, 1]"),
        ("optim.milestones=[10, -1]", "optim.milestones: invalid value [10, -1] (entry -1); must be in"),
        ("optim.warmup_epochs=300", "optim.warmup_epochs: invalid value 300.0; must be <= optim.epochs"),
        ("checkpoint.keep=0", "checkpoint.keep: invalid value 0; must be > 0"),
        ("deepspeed.config.steps_per_print=.inf", "deepspeed.config.steps_per_print: invalid value inf"),
    ],
)
def test_item9_bad_numbers_name_key_and_value(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_item9_exponent_notation_is_a_number(tmp_path):
    assert load_config(None, ["optim.lr=1e-3"]).optim.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("optim: {lr: 3e-2, weight_decay: 1E-4}\n")  # YAML 1.1 reads these as strings
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (0.03, 0.0001)


def _numeric_keys(cls: type, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _numeric_keys(tp, f"{prefix}{f.name}.")
        elif any(a in (int, float, list) for a in (typing.get_args(tp) or (tp,))):
            keys.append(f"{prefix}{f.name}")
    return keys


def test_item9_every_numeric_key_has_a_range():
    """No int or float key can reach a run unchecked: each one has a range in NUMBER_RANGES."""
    keys = _numeric_keys(Config)
    assert "optim.lr" in keys and "method.moco.K" in keys and "optim.milestones" in keys
    assert sorted(set(keys) - set(NUMBER_RANGES)) == []
    assert sorted(set(NUMBER_RANGES) - set(keys)) == []


def test_item9_cli_refuses_before_any_work(tmp_path):
    out = tmp_path / "run"
    proc = _train(_write_config(tmp_path / "c.yaml", out), "method.moco.T=.inf")
    assert "method.moco.T: invalid value inf; must be a finite number" in _error_line(proc)
    assert str(tmp_path / "c.yaml") in _error_line(proc)
    assert not out.exists()  # nothing was set up


# ------------------------------------------------------------------------- item 10: no credentials kept


def test_item10_tracking_uri_is_stored_without_credentials(tmp_path):
    from unmix.training.backbone_file import BackboneMeta, load_backbone, save_backbone
    from unmix.training.backbones import build_backbone

    uri = "https://alice:s3cret@mlflow.example.org:5000/base?token=abc&experiment=3"
    assert without_credentials(uri) == "https://mlflow.example.org:5000/base?experiment=3"
    assert without_credentials("postgresql://u:pw@db/mlflow") == "postgresql://db/mlflow"
    assert without_credentials("sqlite:////runs/mlflow.db") == "sqlite:////runs/mlflow.db"
    net = build_backbone("resnet10", width=8)
    path = save_backbone(tmp_path / "backbone.pt", net, BackboneMeta.of(net, mlflow_tracking_uri=uri))
    raw = path.read_bytes()
    assert b"s3cret" not in raw and b"alice" not in raw and b"abc" not in raw
    assert load_backbone(path)[1].mlflow_tracking_uri == "https://mlflow.example.org:5000/base?experiment=3"


# ---------------------------------------------------------------------------- item 12: YAML pass-through


@pytest.mark.parametrize(
    "override, needle",
    [
        (
            "deepspeed.config.tensorboard={enabled: true, output_path: /tmp/anywhere}",
            "deepspeed.config.tensorboard: not passed through to DeepSpeed",
        ),
        ("deepspeed.config.csv_monitor={enabled: true}", "deepspeed.config.csv_monitor: not passed through"),
        ("deepspeed.config.train_batch_size=4", "deepspeed.config.train_batch_size: not passed through"),
        (
            "deepspeed.config.zero_optimization.stage=3",
            "zero_optimization.stage: not passed through to DeepSpeed (set deepspeed.zero_stage)",
        ),
        (
            "deepspeed.config.zero_optimization.offload_optimizer={device: nvme, nvme_path: /x}",
            "deepspeed.config.zero_optimization.offload_optimizer: not passed through",
        ),
        ("deepspeed.config.fp16.loss_scale=[1, 2]", "deepspeed.config.fp16.loss_scale: invalid value [1, 2]"),
    ],
)
def test_item12_deepspeed_pass_through_is_allow_listed(override, needle):
    with pytest.raises(ConfigError) as exc:
        load_config(None, [override])
    assert needle in str(exc.value)


def test_item12_allowed_tuning_keys_pass_through():
    from unmix.training.engine import deepspeed_config

    cfg = load_config(
        None,
        ["deepspeed.config.zero_optimization.reduce_bucket_size=5e8", "deepspeed.config.steps_per_print=7"],
    )
    ds = deepspeed_config(cfg, 8)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8 and ds["steps_per_print"] == 7


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)


def test_item12_yaml_alias_bomb_and_huge_or_recursive_documents_are_refused(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("deepspeed:\n  config:\n    " + BOMB.replace("\n", "\n    "))
    assert len(bomb.read_bytes()) < 600  # a few hundred bytes that expand to 9**9 values
    with pytest.raises(ConfigError, match=r"bomb\.yaml: the YAML expands to more than 100000 values"):
        load_config(bomb)
    loop = tmp_path / "loop.yaml"
    loop.write_text("deepspeed: {config: &a {steps_per_print: *a}}\n")
    with pytest.raises(ConfigError, match=r"loop\.yaml: a YAML alias refers to itself"):
        load_config(loop)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20) + "\n")
    with pytest.raises(ConfigError, match=r"huge\.yaml: \d+ bytes; a config is at most 1048576 bytes"):
        load_config(huge)
    with pytest.raises(ConfigError, match="override deepspeed.config: the YAML expands"):
        load_config(None, ["deepspeed.config=" + "{" + BOMB.replace("\n", ", ")[:-2] + "}"])


def test_item12_cli_refuses_a_bomb_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    out = tmp_path / "run"
    proc = _train(bomb, f"output_dir={out}")
    assert "the YAML expands to more than 100000 values" in _error_line(proc)
    assert not out.exists()


# ---------------------------------------------------------------------- item 13: writes and damage


def test_item13_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = tmp_path / "result.json"
    path.write_text('{"top1": 50.0}\n')

    with pytest.raises(atomic.WriteError) as exc, atomic.replacing(path) as tmp:
        tmp.write_text('{"top1": 7')  # half written when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(exc.value) == f"{path}: cannot write: disk full"
    assert path.read_text() == '{"top1": 50.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]  # no temporary file left
    atomic.write_text(path, '{"top1": 60.0}\n')
    assert path.read_text() == '{"top1": 60.0}\n'


def test_item13_malformed_complete_is_skipped_with_a_reason(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 2, keep=2)
    _save(ckpt, 4, keep=2)
    for bad in ("[]", '{"files": 3}', '{"files": {"../../etc/passwd": [1, "x"]}}', "{"):
        (ckpt / "step_00000004" / checkpoint.COMPLETE).write_text(bad)
        with pytest.warns(UserWarning, match="step_00000004: malformed COMPLETE marker"):
            assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000002"


def test_item13_read_only_output_dir_is_refused_before_any_work(tmp_path):
    _namespace_or_skip()
    ro = tmp_path / "ro"
    ro.mkdir()
    config = _write_config(tmp_path / "c.yaml", ro / "run")
    script = (
        f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && "
        f"exec {sys.executable} -m unmix train {config}"
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert f"output_dir {ro / 'run'}: cannot write there: read-only file system" in _error_line(proc)


def test_item13_full_disk_names_the_path_and_keeps_the_last_good_checkpoint(trained, tmp_path):
    """A resumed run on a 6 MB file system (one checkpoint is ~4 MB): the next checkpoint cannot be written.
    Exit 2 with one line naming the checkpoint path and "disk full"; the partial checkpoint is removed and
    the last good one (step 4) still verifies."""
    _namespace_or_skip()
    mnt = tmp_path / "small"
    mnt.mkdir()
    config = _write_config(
        tmp_path / "c.yaml", mnt / "run", **{"optim.epochs": 2, "checkpoint.every_steps": 1}
    )
    check = (
        "from pathlib import Path; from unmix.training import checkpoint as c; "
        f"d = Path('{mnt}/run/checkpoints'); "
        "print('TAGS', ','.join(sorted(p.name for p in d.iterdir() if p.is_dir())), "
        "'VERIFY', c.verify(d / 'step_00000004'))"
    )
    script = (
        f"mount -t tmpfs -o size=6m tmpfs {mnt} && mkdir {mnt}/run && "
        f"cp -r {trained}/checkpoints {trained}/config.yaml {mnt}/run/ && "
        f'{sys.executable} -m unmix train {config}; echo EXIT $? >&2; {sys.executable} -c "{check}"'
    )
    proc = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    err = proc.stderr.strip().splitlines()
    assert err[-1] == "EXIT 2", proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = err[-2]
    assert line.startswith(
        f"unmix train: error: {mnt}/run/checkpoints/step_00000005: cannot write the checkpoint"
    )
    assert "disk full" in line and "the last good checkpoint step_00000004 is kept" in line
    assert "TAGS step_00000004 VERIFY None" in proc.stdout, proc.stdout
