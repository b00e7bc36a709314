"""Checkpoint bookkeeping in one process with a stand-in engine: COMPLETE records, the latest pointer,
pruning, detection of truncated/missing/incomplete checkpoints, replacement of a damaged same-step one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from unmix.training import checkpoint
from unmix.training.checkpoint_state import ClientState


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would: one model-states file holding the client state."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(1000)}, **client_state}, path / "mp_rank_00_model_states.pt")


def _save(ckpt: Path, step: int, keep: int = 2) -> Path:
    client = ClientState(step=step, epoch=0, pos=step, config={}, method={}, mlflow_run_id=None)
    return checkpoint.save(FakeEngine(), ckpt, client, {"loader": {"pos": step}}, keep)


def test_save_writes_complete_record_pointer_and_prunes(tmp_path):
    ckpt = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        _save(ckpt, step)
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    assert (ckpt / "latest").read_text() == "step_00000006"
    record = json.loads((ckpt / "step_00000006" / "COMPLETE").read_text())
    assert record["step"] == 6 and record["world_size"] == 1
    assert set(record["files"]) == {"mp_rank_00_model_states.pt", "rank0_state.pt", "config.json"}
    assert checkpoint.verify(ckpt / "step_00000006") is None
    assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000006"


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda p: (p / "COMPLETE").unlink(), "incomplete (no COMPLETE marker"),
        (lambda p: (p / "rank0_state.pt").unlink(), "missing file rank0_state.pt"),
        (
            lambda p: (p / "mp_rank_00_model_states.pt").write_bytes(b"x"),
            "truncated file mp_rank_00_model_states.pt",
        ),
        (lambda p: _flip_byte(p / "mp_rank_00_model_states.pt"), "corrupted file mp_rank_00_model_states.pt"),
    ],
)
def test_damaged_latest_falls_back_with_warning(tmp_path, damage, reason):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 2)
    _save(ckpt, 4)
    damage(ckpt / "step_00000004")
    with pytest.warns(
        UserWarning,
        match="skipped checkpoint\\(s\\) step_00000004: "
        + re.escape(reason)
        + ".*resuming from step_00000002",
    ):
        assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000002"


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_saving_a_step_again_replaces_a_damaged_copy_and_keeps_an_intact_one(tmp_path):
    ckpt = tmp_path / "checkpoints"
    path = _save(ckpt, 4)
    mtime = (path / "COMPLETE").stat().st_mtime_ns
    _save(ckpt, 4)  # intact: kept as is
    assert (path / "COMPLETE").stat().st_mtime_ns == mtime
    (path / "rank0_state.pt").write_bytes(b"")
    _save(ckpt, 4)  # damaged: rewritten
    assert checkpoint.verify(path) is None


def test_no_checkpoint_and_other_world_size(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert checkpoint.find_resumable(ckpt, 1) is None
    _save(ckpt, 2)
    with pytest.raises(checkpoint.ResumeError, match="written by 1 process\\(es\\), this job has 4"):
        checkpoint.find_resumable(ckpt, 4)


def test_diagnostics_written_beside_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    _save(ckpt, 2)
    path = checkpoint.write_diagnostics(ckpt, 3, {"step": 3})
    assert path.parent == ckpt and json.loads(path.read_text())["step"] == 3
    assert checkpoint.find_resumable(ckpt, 1) == ckpt / "step_00000002"
