"""The checkpoint's client state as a typed, versioned record: round trip, migration of the unversioned
layout (version 1, built here as the old loop assembled it), and one-line refusals of newer, malformed or
incomplete ones, both from the record and from the COMPLETE marker before anything is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import unmix
from unmix.training import checkpoint
from unmix.training.checkpoint_state import FORMAT_VERSION, ClientState, FormatError, check_version

PATH = Path("/out/checkpoints/step_00000008")
WHAT_TO_DO = "remove it to fall back to an older checkpoint, or start a new output_dir"


def _record(**kw) -> ClientState:
    fields = {
        "step": 8,
        "epoch": 2,
        "pos": 0,
        "config": {"seed": 3, "optim": {"epochs": 4}},
        "method": {"queue": torch.arange(6.0).reshape(2, 3), "ptr": torch.tensor(4)},
        "mlflow_run_id": "b" * 32,
    }
    return ClientState(**{**fields, **kw})


def _equal(a: ClientState, b: ClientState) -> bool:
    fields = ("step", "epoch", "pos", "config", "mlflow_run_id", "written_by")
    same = all(getattr(a, f) == getattr(b, f) for f in fields)
    return (
        same
        and a.method.keys() == b.method.keys()
        and all(torch.equal(a.method[k], b.method[k]) for k in a.method)
    )


def test_round_trip_ignores_deepspeed_keys_beside_the_record():
    saved = _record().to_saved()
    assert saved["format_version"] == FORMAT_VERSION == 2 and saved["written_by"] == unmix.__version__
    # DeepSpeed's load_checkpoint hands back its own keys with the record
    beside = {"ds_config": {}, "ds_version": "0.19.8", "global_samples": 64}
    assert _equal(ClientState.from_saved({**saved, **beside}, PATH), _record())


def test_unversioned_client_state_is_migrated_with_nothing_lost():
    record = _record()
    old = {  # the dict the loop assembled before the record existed
        "step": record.step,
        "epoch": record.epoch,
        "pos": record.pos,
        "config": record.config,
        "method": record.method,
        "mlflow_run_id": record.mlflow_run_id,
    }
    migrated = ClientState.from_saved(old, PATH)
    assert _equal(migrated, _record(written_by=None))


@pytest.mark.parametrize(
    "saved, message",
    [
        (
            {"format_version": 3, "written_by": "9.1"},
            f"{PATH}: checkpoint format version 3 (written by unmix 9.1) is newer than this unmix "
            f"({unmix.__version__}) reads (1 to 2); resume with the unmix version that wrote it, or start a "
            "new output_dir",
        ),
        (
            {"format_version": 0},
            f"{PATH}: checkpoint format_version 0 is not a version unmix writes (1 to 2); {WHAT_TO_DO}",
        ),
        (
            {"format_version": "2"},
            f"{PATH}: checkpoint format_version '2' is not a version unmix writes (1 to 2); {WHAT_TO_DO}",
        ),
        (
            {"method": None},
            f"{PATH}: the client state (format version 2) has no 'method'; not resuming from it "
            f"({WHAT_TO_DO})",
        ),
        (
            {"step": -1},
            f"{PATH}: the client state's step is int -1; not resuming from it ({WHAT_TO_DO})",
        ),
        (
            {"pos": True},
            f"{PATH}: the client state's pos is bool True; not resuming from it ({WHAT_TO_DO})",
        ),
        (
            {"config": "seed: 3"},
            f"{PATH}: the client state's config is str 'seed: 3'; not resuming from it ({WHAT_TO_DO})",
        ),
    ],
)
def test_newer_malformed_or_incomplete_state_is_refused_in_one_line(saved, message):
    state = {**_record().to_saved(), **saved}
    state = {k: v for k, v in state.items() if v is not None}  # None: the key is missing
    with pytest.raises(FormatError) as exc:
        ClientState.from_saved(state, PATH)
    assert str(exc.value) == message


def test_check_version_accepts_every_known_version():
    assert [check_version(v, PATH) for v in range(1, FORMAT_VERSION + 1)] == [1, 2]


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint would: one model-states file holding the client state."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest=True):
        path = Path(save_dir) / tag
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(4)}, **client_state}, path / "mp_rank_00_model_states.pt")


def test_complete_records_the_version_and_a_newer_one_is_refused_before_loading(tmp_path):
    ckpt = tmp_path / "checkpoints"
    path = checkpoint.save(FakeEngine(), ckpt, _record(), {"loader": {}}, keep=2)
    record = json.loads((path / checkpoint.COMPLETE).read_text())
    assert (record["format_version"], record["written_by"]) == (FORMAT_VERSION, unmix.__version__)
    assert checkpoint.newest_config(ckpt) == (path, _record().config)
    assert checkpoint.find_resumable(ckpt, 1) == path
    (path / checkpoint.COMPLETE).write_text(json.dumps({**record, "format_version": 3, "written_by": "9.1"}))
    newer = f"{path}: checkpoint format version 3 (written by unmix 9.1) is newer than this unmix"
    with pytest.raises(checkpoint.ResumeError, match="^" + re.escape(newer)):
        checkpoint.newest_config(ckpt)  # before the config is compared with the job's
    with pytest.raises(checkpoint.ResumeError, match="^" + re.escape(newer)):
        checkpoint.find_resumable(ckpt, 1)  # not skipped in favour of an older one: refused
