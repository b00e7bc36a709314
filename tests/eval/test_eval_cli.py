"""``unmix linear`` / ``unmix knn`` end to end on the digits sample shards (DALI on the CPU, tiny epochs)."""

from __future__ import annotations

import json

import pytest
import torch

from unmix.cli import main

# digits are 8x8 upsampled to 32x32: a 16-pixel crop loses nothing and costs a quarter of the compute
FAST = ["device=cpu", "data.crop=16", "num_threads=1", "batch_size=128"]
NO_CROP = [a for a in FAST if not a.startswith("data.crop")]  # the backbone's meta says crop 16


def test_random_init_linear_end_to_end(sample_train, sample_val, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "linear.json"
    status = main(
        [
            "linear",
            "--random-init",
            "resnet10",
            "--experiment",
            "floor",
            "--tracking-uri",
            uri,
            "--train",
            str(sample_train),
            "--val",
            str(sample_val),
            "--json",
            str(out),
            "epochs=2",
            "features=cached",
            "lr=0.1",
            *FAST,
        ]
    )
    assert status == 0
    assert "linear top-1" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["epochs"] == 2 and res["backbone"] == "random_init:resnet10" and res["val_samples"] == 359
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0
    run = MlflowClient(uri).get_run(res["run_id"])
    assert run.data.tags["unmix.kind"] == "random_init" and run.data.tags["random_init"] == "resnet10"
    assert run.info.status == "FINISHED"
    assert run.data.metrics["linear_top1"] == pytest.approx(res["top1"])
    assert MlflowClient(uri).get_experiment(run.info.experiment_id).name == "floor"
    hist = MlflowClient(uri).get_metric_history(res["run_id"], "train_loss")
    assert [m.step for m in hist] == [1, 2]


def test_sgd_probe_chooses_lr_and_weight_decay_on_held_out_train(sample_train, sample_val, tmp_path, capsys):
    """``protocol=moco`` on cached features (the default search, here narrowed by ``lr_grid=``): each
    (lr, weight_decay) trained on train less the held-out 10 %, the best refit on all of train; the choice
    and every held-out score in the JSON, on stdout and in MLflow."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "linear.json"
    args = ["--random-init", "resnet10", "--width", "16", "--tracking-uri", uri, "--json", str(out)]
    args += ["--train", str(sample_train), "--val", str(sample_val)]
    assert main(["linear", *args, "protocol=moco", "lr_grid=0.03,0.3", "epochs=3", *FAST]) == 0
    res = json.loads(out.read_text())
    pairs = [(s["lr"], s["weight_decay"]) for s in res["search"]]
    assert res["protocol"] == "moco" and pairs == [
        (lr, wd) for lr in (0.03, 0.3) for wd in (0.001, 0.01, 0.1)
    ]
    best = min(res["search"], key=lambda s: s["holdout_loss"])  # the lowest held-out cross-entropy
    assert (res["lr"], res["weight_decay"]) == (best["lr"], best["weight_decay"])
    printed = capsys.readouterr().out
    assert "sgd lr 0.03  weight_decay 0.001  held-out loss" in printed
    assert f"lr {best['lr']:g}, weight_decay {best['weight_decay']:g} chosen on held-out train" in printed
    run = MlflowClient(uri).get_run(res["run_id"])
    assert run.data.metrics["lr_chosen"] == res["lr"] and run.data.params["lr_grid"] == "0.03,0.3"
    assert run.data.metrics["weight_decay_chosen"] == res["weight_decay"]
    assert run.data.params["wd_grid"] == "0.001,0.01,0.1"
    for key in ("search_holdout_loss", "search_holdout_top1"):
        assert sorted(m.step for m in MlflowClient(uri).get_metric_history(res["run_id"], key)) == list(
            range(6)
        )


def test_pretrained_backbone_reports_onto_its_run(sample_train, sample_val, tmp_path, capsys):
    """linear (augmented, the paper's path) and knn on a backbone.pt whose pretraining run is FINISHED."""
    from mlflow.tracking import MlflowClient

    from unmix.training.backbone_file import BackboneMeta, save_backbone
    from unmix.training.backbones import build_backbone

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("pretraining")
    pre = client.create_run(exp, run_name="moco", tags={"unmix.kind": "pretrain", "method": "moco_v2"})
    client.set_terminated(pre.info.run_id, "FINISHED")
    torch.manual_seed(0)
    net = build_backbone("resnet10", crop=16)
    meta = BackboneMeta.of(
        net,
        method="moco_v2",
        unmix=True,
        epochs=1,
        mlflow_run_id=pre.info.run_id,
        mlflow_tracking_uri=uri,
        mlflow_experiment="pretraining",
        crop=16,
    )
    path = save_backbone(tmp_path / "backbone.pt", net, meta)
    file_bytes = path.read_bytes()

    lin_json, knn_json = tmp_path / "lin.json", tmp_path / "knn.json"
    args = ["--backbone", str(path), "--train", str(sample_train), "--val", str(sample_val)]
    linear = ["epochs=1", "lr=0.1", "features=augmented"]
    assert main(["linear", *args, "--json", str(lin_json), *linear, *NO_CROP]) == 0
    assert main(["knn", *args, "--json", str(knn_json), "--k", "20", *NO_CROP]) == 0
    lin, knn = json.loads(lin_json.read_text()), json.loads(knn_json.read_text())
    assert lin["pretrain_run_id"] == knn["pretrain_run_id"] == pre.info.run_id
    assert lin["val_samples"] == knn["val_samples"] == 359
    assert lin["crop"] == 16  # from the backbone's pretraining crop
    assert (lin["protocol"], lin["features"]) == ("moco", "augmented")
    assert 10.0 < knn["top1"] <= 100.0  # random conv features of digits already cluster by class

    after = client.get_run(pre.info.run_id)
    assert after.info.status == "FINISHED"
    assert after.data.metrics["linear_top1"] == pytest.approx(lin["top1"])
    assert after.data.metrics["linear_top5"] == pytest.approx(lin["top5"])
    assert after.data.metrics["knn_top1"] == pytest.approx(knn["top1"])
    for res, kind in ((lin, "linear_eval"), (knn, "knn_eval")):
        ev = client.get_run(res["run_id"])
        assert ev.info.experiment_id == exp
        assert ev.data.tags["unmix.pretrain_run_id"] == pre.info.run_id and ev.data.tags["unmix.kind"] == kind
    assert path.read_bytes() == file_bytes


def test_key_mismatch_is_a_clear_error(tmp_path, capsys):
    from unmix.training.backbones import build_backbone

    path = tmp_path / "r18.pth"
    state = build_backbone("resnet18").state_dict()
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # DDP-prefixed keys
    status = main(
        [
            "linear",
            "--backbone",
            str(path),
            "--arch",
            "resnet18",
            "--train",
            str(tmp_path),
            "--val",
            str(tmp_path),
            "--no-mlflow",
            "device=cpu",
        ]
    )
    err = capsys.readouterr().err
    assert status == 2
    assert "unmix linear: error:" in err and str(path) in err
    assert "missing ['bn1.bias'" in err and "unexpected ['module.bn1.bias'" in err


def test_unknown_override_is_a_clear_error(tmp_path, capsys):
    status = main(
        [
            "knn",
            "--random-init",
            "resnet10",
            "--train",
            str(tmp_path),
            "--val",
            str(tmp_path),
            "--no-mlflow",
            "epochs=3",
        ]
    )
    assert status == 2
    assert "unknown key 'epochs'" in capsys.readouterr().err


def test_the_default_probe_is_logreg_and_knn_floors_are_tagged(sample_train, sample_val, tmp_path):
    """``unmix linear`` with no protocol= and no SGD key runs the reference probe on cached features;
    `unmix knn --random-init/--pixels` log floor runs tagged like the linear floors; every eval run names
    its protocol."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--train", str(sample_train), "--val", str(sample_val), "--experiment", "floors"]
    common += ["--tracking-uri", uri]
    out = {name: tmp_path / f"{name}.json" for name in ("logreg", "knn_random", "knn_pixels")}
    rand = ["--random-init", "resnet10", "--width", "16"]
    assert main(["linear", *rand, *common, "--json", str(out["logreg"]), *FAST]) == 0
    assert main(["knn", *rand, *common, "--json", str(out["knn_random"]), "--k", "20", *FAST]) == 0
    assert main(["knn", "--pixels", *common, "--json", str(out["knn_pixels"]), "--k", "20", *FAST]) == 0
    res = {name: json.loads(p.read_text()) for name, p in out.items()}
    assert res["logreg"]["protocol"] == "logreg" and res["logreg"]["val_samples"] == 359
    assert res["logreg"]["features"] == "cached"
    assert res["logreg"]["top1"] > 50.0  # chance: 10 %
    client = MlflowClient(uri)
    expect = {
        "logreg": ("random_init", "logreg", "linear_top1"),
        "knn_random": ("random_init", "knn", "knn_top1"),
        "knn_pixels": ("pixels", "knn", "knn_top1"),
    }
    for name, (kind, protocol, metric) in expect.items():
        run = client.get_run(res[name]["run_id"])
        assert run.data.tags["unmix.kind"] == kind and run.data.tags["unmix.protocol"] == protocol, name
        assert run.data.metrics[metric] == pytest.approx(res[name]["top1"])
        assert run.info.status == "FINISHED"
    logreg_run = client.get_run(res["logreg"]["run_id"])
    assert logreg_run.data.params["protocol"] == "logreg" and "lr" not in logreg_run.data.params
    assert logreg_run.data.metrics["logreg_l2_chosen"] == pytest.approx(res["logreg"]["l2"])
