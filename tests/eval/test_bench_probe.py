"""``unmix bench probe``, registered by ``unmix.eval.cli``, run by ``unmix.eval.bench_probe``."""

from __future__ import annotations

import re

import pytest


def test_probe_samples_are_the_ones_with_a_crop() -> None:
    from unmix.eval.bench_probe import SAMPLES_CROP
    from unmix.eval.cli import PROBE_SAMPLES

    assert sorted(PROBE_SAMPLES) == sorted(SAMPLES_CROP)


def test_bench_probe_speed_runs_from_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    """The speed part on a tiny problem, timed on all its rows: "measured", not scaled."""
    from unmix.cli import main

    argv = ["bench", "probe", "--skip-accuracy", "--speed-rows", "64", "--target-rows", "64"]
    assert main([*argv, "--dim", "8", "--classes", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^logreg objective .* 64 x 8 features, 3 classes, cpu .*\(measured; median of 3: ", out, re.M
    )
    assert "projected grid + refit: 1,000 evaluations" in out


def test_bench_probe_refuses_a_gpu_it_does_not_have(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from unmix.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    assert main(["bench", "probe", "--skip-accuracy", "--skip-speed", "--device", "gpu"]) == 2
    assert (
        capsys.readouterr().err.strip() == "unmix bench probe: error: --device gpu: no CUDA device is visible"
    )
