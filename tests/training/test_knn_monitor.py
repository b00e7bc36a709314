"""The kNN monitor of pretraining: the same number as `unmix knn`, when it runs, and that it is off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from unmix.training.config import load_config
from unmix.training.knn_monitor import KnnMonitor, calibrate_batchnorm


def _cfg(train: Path | str, val: Path | str, *extra: str):
    return load_config(
        None,
        [
            f"data.train={train}",
            f"data.val={val}",
            "data.device=cpu",
            "data.crop=16",
            "data.threads=1",
            "optim.epochs=7",
            *extra,
        ],
    )


def test_schedule_and_off_switches():
    m = KnnMonitor(_cfg("t", "v", "eval.knn_every_epochs=3"), 0, 1, torch.device("cpu"), 8)
    assert [e for e in range(8) if m.due(e)] == [3, 6, 7]  # every 3 epochs and after the last
    assert not KnnMonitor(_cfg("t", "v"), 0, 1, torch.device("cpu"), 8).enabled  # default: off
    assert not KnnMonitor(_cfg("t", "", "eval.knn_every_epochs=1"), 0, 1, torch.device("cpu"), 8).enabled


def test_at_start_scores_the_initial_weights_of_a_fresh_run_only(sample_train, sample_val):
    logged = []

    class Tracker:
        def log_metrics(self, metrics, step):
            logged.append((step, metrics["knn_top1"]))

    torch.manual_seed(0)
    from unmix.training.backbones import build_backbone

    net = build_backbone("resnet10", crop=16, width=8)
    on = _cfg(sample_train, sample_val, "eval.knn_every_epochs=3", "eval.knn_at_start=true", "eval.knn_k=20")
    mon = KnnMonitor(on, 0, 1, torch.device("cpu"), 128)
    assert mon.at_start(5, net, Tracker()) is None and not logged  # resumed at step 5: no floor again
    before = {k: v.clone() for k, v in net.state_dict().items()}
    result = mon.at_start(0, net, Tracker())
    calibrated = calibrate_batchnorm(net, mon._loader("train"), torch.device("cpu"))
    assert logged == [(0, result.top1)] and result.top1 == mon.evaluate(calibrated).top1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # the run's net: untouched
    off = _cfg(sample_train, sample_val, "eval.knn_every_epochs=3")  # default: no floor
    assert KnnMonitor(off, 0, 1, torch.device("cpu"), 128).at_start(0, net, Tracker()) is None
    monitor_off = _cfg(sample_train, sample_val, "eval.knn_at_start=true")  # needs the monitor on
    assert KnnMonitor(monitor_off, 0, 1, torch.device("cpu"), 128).at_start(0, net, Tracker()) is None
    assert len(logged) == 1


def test_calibrate_bn_scores_every_epoch_as_the_floor_is(sample_train, sample_val):
    """``eval.knn_calibrate_bn``: after an epoch, the score of the calibrated copy (the floor's procedure),
    not of the running statistics; the run's network keeps its own statistics. Default: as the authors."""

    class Tracker:
        def log_metrics(self, metrics, step):
            pass

    torch.manual_seed(0)
    from unmix.training.backbones import build_backbone

    net = build_backbone("resnet10", crop=16, width=8)
    for m in net.modules():  # statistics of no data, far from the images': calibration must move the score
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(4.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    args = (sample_train, sample_val, "eval.knn_every_epochs=1", "eval.knn_k=20")
    on = KnnMonitor(_cfg(*args, "eval.knn_calibrate_bn=true"), 0, 1, torch.device("cpu"), 128)
    off = KnnMonitor(_cfg(*args), 0, 1, torch.device("cpu"), 128)
    calibrated = on.evaluate(calibrate_batchnorm(net, on._loader("train"), torch.device("cpu")))
    assert on.after_epoch(1, 10, net, Tracker()).top1 == calibrated.top1
    assert off.after_epoch(1, 10, net, Tracker()).top1 == off.evaluate(net).top1 != calibrated.top1
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_calibrated_statistics_are_the_batch_averages_and_the_original_keeps_its_own():
    from unmix.training.batchnorm import SplitBatchNorm2d

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), SplitBatchNorm2d(4, num_splits=4))
    batches = [{"image": torch.randn(n, 3, 6, 6) * 2 + 1} for n in (8, 8, 5)]  # 5: not divisible by 4
    got = calibrate_batchnorm(net, batches, torch.device("cpu"))
    assert not got.training and torch.equal(net[1].running_mean, torch.zeros(4))  # the original: untouched
    with torch.no_grad():
        acts = [net[0](b["image"]) for b in batches]
    means = torch.stack([a.mean(dim=(0, 2, 3)) for a in acts]).mean(0)
    varis = torch.stack([a.transpose(0, 1).flatten(1).var(dim=1, unbiased=True) for a in acts]).mean(0)
    torch.testing.assert_close(got[1].running_mean, means, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1].running_var, varis, rtol=1e-5, atol=1e-6)


def test_monitor_equals_unmix_knn_and_leaves_the_backbone_alone(sample_train, sample_val, tmp_path):
    from unmix.eval.jobs import BackboneSpec, run_knn
    from unmix.eval.protocols import LinearProtocol
    from unmix.training.backbone_file import BackboneMeta, save_backbone
    from unmix.training.backbones import build_backbone

    torch.manual_seed(0)
    backbone = build_backbone("resnet10", crop=16, width=8)
    for mod in backbone.modules():  # non-trivial BN statistics, so eval mode matters
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    path = save_backbone(tmp_path / "backbone.pt", backbone, BackboneMeta.of(backbone, crop=16))

    cfg = _cfg(sample_train, sample_val, "eval.knn_every_epochs=1", "eval.knn_k=20", "eval.knn_t=0.07")
    backbone.train()
    rng = torch.get_rng_state()
    got = KnnMonitor(cfg, 0, 1, torch.device("cpu"), 128).evaluate(backbone)
    assert backbone.training and torch.equal(torch.get_rng_state(), rng)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # running statistics did not move

    proto = LinearProtocol(batch_size=128, device="cpu", num_threads=1)
    want = run_knn(
        BackboneSpec(path=str(path)), str(sample_train), str(sample_val), proto, k=20, t=0.07, track=False
    )
    assert got.total == want["val_samples"] == 359
    assert got.top1 == want["top1"] and got.top5 == want["top5"]
    assert 15 < got.top1 < 100  # random features of digits: above chance (10 %), not a constant


def test_eval_keys_validated_and_resume_safe():
    from unmix.training.config import ConfigError, diff, to_dict

    for bad, msg in (
        ("eval.knn_k=0", "eval.knn_k"),
        ("eval.knn_t=0", "eval.knn_t"),
        ("eval.knn_every_epochs=-1", ""),
    ):
        with pytest.raises(ConfigError, match=msg or "eval.knn_every_epochs"):
            _cfg("t", "v", bad)
    a, b = to_dict(_cfg("t", "v")), to_dict(_cfg("t", "v2", "eval.knn_every_epochs=5"))
    assert diff(a, b) == []  # switching the monitor on for a resumed run does not change what it computes


def test_two_ranks_count_every_val_image_once_and_equal_one_process(sample_train, sample_val, tmp_path):
    import json
    import os
    import socket
    import subprocess
    import sys

    from unmix.training.backbones import build_backbone

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = Path(__file__).with_name("knn_monitor_worker.py")
    out = tmp_path / "rank0.json"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(sample_train), str(sample_val), str(out)],
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    got = json.loads(out.read_text())

    torch.manual_seed(0)  # the workers' backbone, evaluated by one process
    cfg = _cfg(sample_train, sample_val, "eval.knn_every_epochs=1", "eval.knn_k=20", "data.crop=8")
    backbone = build_backbone("resnet10", crop=8, width=8)  # 8 px: cheap, enough for this check
    want = KnnMonitor(cfg, 0, 1, torch.device("cpu"), 64).evaluate(backbone)
    assert got["total"] == want.total == 359  # each val image once over the ranks (the bank stays split)
    assert (got["top1"], got["top5"]) == (want.top1, want.top5)
