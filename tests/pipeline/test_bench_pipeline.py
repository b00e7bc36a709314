"""``unmix bench pipeline`` runs end to end on a tiny workload and reports both loaders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from unmix.pipeline.bench_pipeline import torch_unmix


def test_bench_pipeline_cli_tiny(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "unmix.pipeline",
        "bench",
        "pipeline",
        "--make-data",
        "24",
        "--data-dir",
        str(tmp_path / "data"),
        "--crop",
        "32",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeat",
        "1",
        "--threads",
        "1",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert set(d["median"]) == {"dali_plain", "dali_unmix", "torchvision_plain", "torchvision_unmix"}
    assert all(v > 0 for v in d["median"].values()) and all(v > 0 for v in d["median_cpu_ms"].values())
    assert {"speedup_unmix", "cpu_efficiency_unmix", "dali_unmix_cost"} <= set(d["ratios"])
    assert "speedup_unmix" in r.stdout
    assert (tmp_path / "data" / "train" / "manifest.json").is_file()


def test_baseline_unmix_is_the_reference_mixing():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 16, 16)
    modes = set()
    for _ in range(30):
        m, lam = torch_unmix(x)
        lam4 = lam.view(-1, 1, 1, 1)
        if torch.allclose(m, lam4 * x + (1 - lam4) * x.flip(0), atol=1e-6):
            modes.add("mixup")
        else:
            assert torch.all((m == x) | (m == x.flip(0)))
            pasted = (m != x).any(dim=(0, 1)).float()
            assert float(lam[0]) == pytest.approx(1 - float(pasted.mean()), abs=1e-6)
            modes.add("cutmix")
    assert modes == {"mixup", "cutmix"}


def test_stage_recipes_switch_off_what_comes_after_the_stage():
    from unmix.pipeline.augment import get_recipe
    from unmix.pipeline.bench_pipeline import _stage_recipe

    byol = get_recipe("byol")
    crop = _stage_recipe(byol, "crop")
    for v, ref in ((crop.view1, byol.view1), (crop.view2, byol.view2)):
        assert (v.p_jitter, v.p_gray, v.p_blur, v.p_solarize) == (0, 0, 0, 0)
        assert (v.scale, v.ratio, v.p_flip) == (ref.scale, ref.ratio, ref.p_flip)
    colour = _stage_recipe(byol, "colour")
    assert (colour.view1.p_jitter, colour.view1.p_gray, colour.view1.p_blur) == (0.8, 0.2, 0.0)
    blur = _stage_recipe(byol, "blur")
    assert (blur.view1.p_blur, blur.view2.p_blur, blur.view2.p_solarize) == (1.0, 0.1, 0.0)
    assert _stage_recipe(byol, "solarize") == _stage_recipe(byol, "normalize") == byol


def test_bench_pipeline_stages_tiny(tmp_path):
    out = tmp_path / "stages.json"
    cmd = [sys.executable, "-m", "unmix.pipeline", "bench", "pipeline", "--stages", "--make-data", "16"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--recipe", "byol", "--crop", "32", "--batch-size", "4"]
    cmd += ["--steps", "2", "--warmup", "1", "--repeat", "1", "--threads", "1", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    stages = json.loads(out.read_text())["stages"]
    assert list(stages) == ["read", "decode", "crop", "colour", "blur", "solarize", "normalize"]
    assert all(s["images_per_s"] > 0 and s["cpu_ms_per_image"] >= 0 for s in stages.values())
    assert [line.split()[0] for line in r.stdout.splitlines()[-7:]] == list(stages)


def test_bench_pipeline_unmix_cost_tiny(tmp_path):
    out = tmp_path / "cost.json"
    cmd = [sys.executable, "-m", "unmix.pipeline", "bench", "pipeline", "--unmix-cost", "--make-data", "16"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--crop", "32", "--batch-size", "4", "--threads", "1"]
    cmd += ["--steps", "2", "--warmup", "1", "--repeat", "3", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cost = json.loads(out.read_text())["unmix_cost"]
    assert cost["pairs"] == 3 and cost["off_cpu_ms"] > 0 and cost["on_cpu_ms"] > 0
    assert cost["fraction_median"] == cost["diff_median_ms"] / cost["off_cpu_ms"]
    assert "on - off" in r.stdout and "as a fraction" in r.stdout


def test_bench_pipeline_layout_cost_tiny(tmp_path):
    out = tmp_path / "layout.json"
    cmd = [sys.executable, "-m", "unmix.pipeline", "bench", "pipeline", "--layout-cost", "--make-data", "16"]
    cmd += ["--data-dir", str(tmp_path / "data"), "--crop", "32", "--batch-size", "4", "--threads", "1"]
    cmd += ["--steps", "2", "--warmup", "1", "--repeat", "2", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    cost = json.loads(out.read_text())["layout_cost"]
    assert cost["pairs"] == 2 and cost["off_cpu_ms"] > 0 and cost["on_cpu_ms"] > 0
    assert "NCHW + convert" in r.stdout and "HWC - NCHW" in r.stdout


def test_compare_loaders_reports_no_ratio_over_a_zero_baseline(monkeypatch, capsys):
    """A loader whose CPU time read zero (prefetched batches, a short run) gives no ratio, not a crash."""
    import argparse

    from unmix.pipeline import bench_pipeline as bp

    def dali(shards, args, unmix):
        return (200.0, 0.0)

    def tv(shards, args, unmix):
        return (100.0, 3.0 if unmix else 2.0)

    monkeypatch.setattr(bp, "measure_dali", dali)
    monkeypatch.setattr(bp, "measure_torchvision", tv)
    out = bp.compare_loaders("x", argparse.Namespace(only=None, repeat=1, shards=None))
    r = out["ratios"]
    assert r["speedup_unmix"] == 2.0 and r["torchvision_unmix_cpu_cost"] == pytest.approx(0.5)
    assert r["cpu_efficiency_unmix"] is None and r["dali_unmix_cpu_cost"] is None
    assert "n/a  (its baseline measured zero" in capsys.readouterr().out


def test_cpu_seconds_counts_this_process_finely():
    from unmix.pipeline.bench_pipeline import _cpu_seconds

    c0 = _cpu_seconds()
    sum(i * i for i in range(20000))  # well under one 10 ms clock tick
    assert _cpu_seconds() > c0
