"""The start-up version check: one line naming the package below its floor; DALI's CUDA flavours."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from unmix.cli import main
from unmix.training import versions
from unmix.training.preemption import SIGNALS, _Early
from unmix.training.versions import VersionError, check

GOOD = {"torch": "2.14.1", "deepspeed": "0.19.8", "nvidia-dali-cuda120": "2.4.0", "nvidia-dali-cuda130": None}


def test_installed_stack_passes():
    check(need_dali=True)  # what CI runs on must pass its own check
    assert check(versions=GOOD, torch_cuda="12.8") == []


@pytest.mark.parametrize(
    ("name", "old", "floor"),
    [
        ("deepspeed", "0.17.1", "0.17.2"),
        ("nvidia-dali-cuda120", "1.46.0", "1.47"),
        ("torch", "2.9.0", "2.9.1"),
    ],
)
def test_a_version_below_its_floor_is_one_line_naming_the_package(name, old, floor):
    with pytest.raises(VersionError) as err:
        check(versions={**GOOD, name: old}, torch_cuda="12.8")
    msg = str(err.value)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"{name} {old} is older than {floor}")


def test_dali_flavours():
    cu13 = {**GOOD, "nvidia-dali-cuda120": None, "nvidia-dali-cuda130": "1.51.2"}
    assert check(versions=cu13, torch_cuda="13.0") == []
    with pytest.raises(VersionError, match="nvidia-dali-cuda130 1.50.0 is older than 1.51"):
        check(versions={**cu13, "nvidia-dali-cuda130": "1.50.0"}, torch_cuda="13.0")
    with pytest.raises(VersionError, match="both installed"):
        check(versions={**GOOD, "nvidia-dali-cuda130": "2.4.0"})
    (warning,) = check(versions=GOOD, torch_cuda="13.0")  # the CUDA 12 wheel next to a CUDA 13 torch
    assert "unmix[cu13]" in warning and "nvidia-dali-cuda120" in warning
    missing = {**GOOD, "nvidia-dali-cuda120": None}
    with pytest.raises(VersionError, match=r"DALI is not installed: pip install 'unmix\[cu13\]'"):
        check(versions=missing)
    assert check(need_dali=False, versions=missing) == []  # data.source=synthetic needs no DALI


def test_train_refuses_an_old_deepspeed_before_starting(monkeypatch, capsys, tmp_path):
    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda n: "0.16.9" if n == "deepspeed" else real(n))
    demo = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
    args = ["train", str(demo), "data.source=synthetic", f"output_dir={tmp_path}"]
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        assert main(args) == 2
    finally:  # `unmix train` installed its start-up signal recorder; this process goes on
        for s, h in handlers.items():
            signal.signal(s, h)
        _Early.signum, _Early.previous = None, {}
    err = capsys.readouterr().err.strip()
    assert err == (
        "unmix train: error: deepspeed 0.16.9 is older than 0.17.2, which unmix needs "
        f"({versions.WHY['deepspeed']})"
    )


def test_stack_line_names_torch_cuda_driver_and_dali_flavour(monkeypatch):
    monkeypatch.setattr(versions, "driver_version", lambda: "580.65.06")
    line = versions.stack_line()
    assert "(CUDA " in line and "driver 580.65.06" in line and "nvidia-dali-cuda1" in line
