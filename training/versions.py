"""Which versions of torch, DeepSpeed and DALI this code needs, checked at start-up with one line.

The floors are the releases that have what the code relies on (below them it breaks or, worse, runs
wrongly without an error); the versions the test suite runs on are newer (DALI 2.4, DeepSpeed 0.19.8,
torch 2.14):

- DALI 1.47: ``fn.random.beta`` (1.41), ``exec_dynamic`` and zero-copy outputs (1.44), and GPU arithmetic
  on an empty batch (DALI PR 5818, merged February 2025; 1.47 is the first release certain to hold it).
  The Un-Mix graph sends an empty batch to its mixup or its CutMix branch on every batch.
- DeepSpeed 0.17.2: ``torch_autocast``; older releases ignore the key, and bf16 silently becomes fp32.
- torch 2.9.1: pytorch issue 163483 (channels_last ``all_gather``) fixed.

DALI comes as one wheel per CUDA major, ``nvidia-dali-cuda120`` and ``nvidia-dali-cuda130``; both install
the ``nvidia.dali`` module, so exactly one may be installed, and on the GPU its CUDA major should be
torch's (the ``cu12`` / ``cu13`` extras of the distribution).
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

from packaging.version import Version

FLOORS = {"torch": "2.9.1", "deepspeed": "0.17.2"}
DALI_FLAVOURS = {"nvidia-dali-cuda120": ("12", "1.47"), "nvidia-dali-cuda130": ("13", "1.51")}
WHY = {
    "torch": "channels_last all_gather fixed (pytorch issue 163483)",
    "deepspeed": "torch_autocast; older releases ignore it and bf16 silently runs as fp32",
    "dali": "GPU arithmetic on empty batches (DALI PR 5818), fn.random.beta, exec_dynamic",
}


class VersionError(RuntimeError):
    """An installed package is older than the code needs, or DALI is missing or installed twice."""


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def dali_flavour(versions: dict[str, str | None] | None = None) -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed DALI wheel; None when there is none.

    ``versions`` stands in for the installed distributions (tests). Raises :class:`VersionError` when
    both CUDA flavours are installed (they overwrite each other's ``nvidia.dali``).
    """
    found = [(n, v) for n in DALI_FLAVOURS if (v := _version(n, versions)) is not None]
    if len(found) > 1:
        names = " and ".join(f"{n} {v}" for n, v in found)
        raise VersionError(
            f"{names} are both installed and share the nvidia.dali module: uninstall one "
            "(keep the one whose CUDA major is torch's: extras unmix[cu12] / unmix[cu13])"
        )
    return found[0] if found else None


def _version(name: str, versions: dict[str, str | None] | None) -> str | None:
    return versions.get(name) if versions is not None else installed(name)


def check(
    need_dali: bool = True,
    versions: dict[str, str | None] | None = None,
    torch_cuda: str | None = None,
) -> list[str]:
    """Raise :class:`VersionError` (one line naming the package) when a floor is not met.

    ``need_dali``: the run reads through DALI (a missing DALI is then an error). ``versions`` maps
    distribution names to installed versions and ``torch_cuda`` is torch's CUDA version (default: the
    installed ones; tests pass their own). Returns warnings, one line each: a DALI wheel whose CUDA major
    differs from torch's (it loads its own CUDA runtime; a matched install is what is tested).
    """
    for name, floor in FLOORS.items():
        have = _version(name, versions)
        if have is not None and Version(have) < Version(floor):
            raise VersionError(f"{name} {have} is older than {floor}, which unmix needs ({WHY[name]})")
    flavour = dali_flavour(versions)
    if flavour is None:
        if need_dali:
            raise VersionError(
                "DALI is not installed: pip install 'unmix[cu13]' (torch built for CUDA 13) or "
                "'unmix[cu12]' (CUDA 12)"
            )
        return []
    name, have = flavour
    major, floor = DALI_FLAVOURS[name]
    if Version(have) < Version(floor):
        raise VersionError(f"{name} {have} is older than {floor}, which unmix needs ({WHY['dali']})")
    if versions is None and torch_cuda is None:
        import torch

        torch_cuda = torch.version.cuda
    if torch_cuda and torch_cuda.split(".")[0] != major:
        extra = "cu13" if torch_cuda.startswith("13") else "cu12"
        return [
            f"{name} (CUDA {major}) next to torch built for CUDA {torch_cuda}: on a GPU node install "
            f"the matching DALI (uninstall {name}, then pip install 'unmix[{extra}]')"
        ]
    return []


def driver_version() -> str | None:
    """The NVIDIA driver version (``nvidia-smi``), or None where there is no driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def stack_line() -> str:
    """One line: torch and its CUDA, the driver, DeepSpeed, and the DALI wheel (its CUDA flavour)."""
    import torch

    try:
        flavour = dali_flavour()
    except VersionError as exc:
        flavour = ("two DALI wheels", str(exc))
    dali = f"{flavour[0]} {flavour[1]}" if flavour else "DALI not installed"
    return (
        f"torch {torch.__version__} (CUDA {torch.version.cuda}), driver {driver_version() or 'none'}, "
        f"deepspeed {installed('deepspeed') or 'not installed'}, {dali}"
    )
