"""``backbone.pt`` as a typed, versioned record: the round trip, the migration of the unversioned layout
(version 1, built here as the old writer wrote it), and one-line refusals of newer or malformed files."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import unmix
from unmix.cli import main
from unmix.training.backbone_file import FORMAT_VERSION, BackboneMeta, load_backbone, save_backbone
from unmix.training.backbones import build_backbone

PROVENANCE = {
    "crop": 16,
    "method": "byol",
    "unmix": True,
    "epochs": 3,
    "steps": 12,
    "seed": 7,
    "mlflow_run_id": "a" * 32,
    "mlflow_tracking_uri": "sqlite:///mlflow.db",
    "mlflow_experiment": "pretraining",
}


@pytest.fixture
def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone("resnet10", crop=16, width=8)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _v1_file(path, net, **meta) -> None:
    """What ``save_backbone`` wrote before the format was versioned: no format_version, a loose dict."""
    layout = {"arch": net.arch, "small_images": net.small_images, "width": net.width}
    layout["feature_dim"] = net.feature_dim
    torch.save({"state_dict": net.state_dict(), "meta": {**layout, **meta}}, path)


def test_round_trip_records_every_field_and_the_version(tmp_path, net):
    path = save_backbone(tmp_path / "backbone.pt", net, BackboneMeta.of(net, **PROVENANCE))
    raw = torch.load(path, weights_only=True)
    assert raw["format_version"] == FORMAT_VERSION == 2
    assert raw["meta"]["written_by"] == unmix.__version__
    loaded, meta = load_backbone(path)
    assert _same_weights(loaded, net)
    expected = BackboneMeta("resnet10", True, 8, 64, **PROVENANCE, written_by=unmix.__version__)
    assert meta == expected


def test_unversioned_file_is_migrated_with_nothing_lost(tmp_path, net):
    path = tmp_path / "backbone.pt"
    _v1_file(path, net, **PROVENANCE)
    loaded, meta = load_backbone(path)
    assert _same_weights(loaded, net)
    assert meta == BackboneMeta("resnet10", True, 8, 64, **PROVENANCE, written_by=None)


def test_unversioned_file_from_before_width_takes_it_from_the_weights(tmp_path, net):
    path = tmp_path / "backbone.pt"
    torch.save({"state_dict": net.state_dict(), "meta": {"arch": "resnet10", "crop": 16}}, path)
    loaded, meta = load_backbone(path)
    assert (meta.width, meta.small_images, meta.feature_dim) == (8, True, 64)
    assert (meta.crop, meta.method, meta.written_by) == (16, None, None)
    assert _same_weights(loaded, net)


def test_bare_state_dict_needs_and_takes_the_architecture(tmp_path, net):
    path = tmp_path / "resnet.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match="no architecture in the file's metadata"):
        load_backbone(path)
    loaded, meta = load_backbone(path, arch="resnet10")
    assert _same_weights(loaded, net)
    assert meta == BackboneMeta("resnet10", True, 8, 64)


AGAIN = "; export the backbone again with `unmix train`"


@pytest.mark.parametrize(
    "version, words",
    [
        (
            3,
            "format version 3 is newer than this unmix ({v}) reads (1 to 2); evaluate it with the unmix "
            "version that wrote it, or upgrade",
        ),
        (0, "format_version 0 is not a version unmix writes (1 to 2)" + AGAIN),
        ("2", "format_version '2' is not a version unmix writes (1 to 2)" + AGAIN),
        (True, "format_version True is not a version unmix writes (1 to 2)" + AGAIN),
    ],
)
def test_newer_or_malformed_version_is_refused_in_one_line(tmp_path, capsys, net, version, words):
    path = save_backbone(tmp_path / "backbone.pt", net, BackboneMeta.of(net, crop=16))
    torch.save({**torch.load(path, weights_only=True), "format_version": version}, path)
    args = ["linear", "--backbone", str(path), "--train", str(tmp_path), "--val", str(tmp_path)]
    assert main([*args, "--no-mlflow", "device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unmix linear: error: {path}: backbone.pt {words.format(v=unmix.__version__)}"


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"epochs": "ten"}, "metadata epochs='ten' is not of type int"),
        ({"unmix": 1}, "metadata unmix=1 is not of type bool"),
        ({"crop": True}, "metadata crop=True is not of type int"),
        ({"arch": "vit_b_16"}, "metadata arch='vit_b_16' is not one of resnet10, resnet18"),
        ({"optimizer": "sgd"}, "(format version 2) has unknown metadata key(s) optimizer"),
    ],
)
def test_metadata_of_the_wrong_type_or_unknown_is_refused_naming_key_and_value(tmp_path, net, meta, words):
    path = save_backbone(tmp_path / "backbone.pt", net, BackboneMeta.of(net, crop=16))
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "meta": {**raw["meta"], **meta}}, path)
    with pytest.raises(ValueError) as exc:
        load_backbone(path)
    assert str(exc.value).startswith(f"{path}: backbone.pt {words}")


def test_unknown_keys_of_an_unversioned_file_are_dropped(tmp_path, net):
    """Version 1 never had keys beyond today's fields; anything else in such a file is not read."""
    path = tmp_path / "backbone.pt"
    _v1_file(path, net, crop=16, note="hand-added")
    assert load_backbone(path)[1].crop == 16


def test_writer_refuses_metadata_of_another_backbone(tmp_path, net):
    wrong = dataclasses.replace(BackboneMeta.of(net), width=64)
    with pytest.raises(ValueError, match="does not describe the backbone"):
        save_backbone(tmp_path / "backbone.pt", net, wrong)
    assert not (tmp_path / "backbone.pt").exists()
