"""Hostile inputs to the Slurm scripts (items 3 and 11 of the hostile-input tests): no cluster is started.

localcluster.py runs as root: a ``--dir`` that is a link, another user's or writable by others is
refused (one line, exit 2, nothing written through it), and every start writes a new munge key, 0400.
sweep.sh's compare command is pasteable whatever the names hold; linear.sbatch never glob-expands the
user's ``UNMIX_*_ARGS``; a ``%`` in output_dir reaches Slurm's log path as ``%%``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCALCLUSTER = REPO / "slurm" / "localcluster.py"


def _load_localcluster():
    spec = importlib.util.spec_from_file_location("unmix_localcluster_hostile", LOCALCLUSTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


localcluster = _load_localcluster()


def _one_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _start(directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(LOCALCLUSTER), "start", "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )


# ------------------------------------------------------------------------- item 3: localcluster --dir


def test_localcluster_refuses_a_linked_dir(tmp_path: Path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "slurm.conf").write_text("precious")
    os.chmod(victim / "slurm.conf", 0o644)
    os.symlink(victim, tmp_path / "link")
    proc = _start(tmp_path / "link")
    assert proc.returncode == 2
    _one_line(proc.stderr, "--dir", "is a symbolic link")
    assert (victim / "slurm.conf").read_text() == "precious" and sorted(os.listdir(victim)) == ["slurm.conf"]
    assert stat.S_IMODE((victim / "slurm.conf").stat().st_mode) == 0o644


def test_localcluster_refuses_a_dir_others_may_write_or_own(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    proc = _start(shared)
    assert proc.returncode == 2
    _one_line(proc.stderr, f"--dir {shared} is writable by group or others")
    assert os.listdir(shared) == []
    if os.geteuid() == 0:  # only root can hand a directory to another user
        other = tmp_path / "other"
        other.mkdir(mode=0o700)
        os.chown(other, 65534, 65534)
        proc = _start(other)
        assert proc.returncode == 2
        _one_line(proc.stderr, "is owned by uid 65534, not by the caller")


def test_localcluster_creates_its_dir_0700_and_a_new_0400_key_every_start(tmp_path: Path):
    root = tmp_path / "cluster"
    cluster = localcluster.LocalCluster(root)
    cluster.write_config()  # what `start` does before it starts a daemon
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    key = root / "munge" / "munge.key"
    first = key.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o400 and len(first) == 1024
    os.chmod(key, 0o644)  # an old, world-readable key: never reused
    cluster.write_config()
    assert key.read_bytes() != first and stat.S_IMODE(key.stat().st_mode) == 0o400
    # a link planted where the key goes: replaced, not written through
    victim = tmp_path / "victim"
    victim.write_text("precious")
    key.unlink()
    os.symlink(victim, key)
    cluster.write_config()
    assert victim.read_text() == "precious" and not key.is_symlink()


# ------------------------------------------------------------------------------- item 11: the scripts


def _script(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "UNMIX_", "MLFLOW_"))}
    base["UNMIX_PYTHON"] = sys.executable
    base.update(env or {})
    return subprocess.run(
        [str(REPO / "slurm" / script), *args], cwd=cwd, env=base, capture_output=True, text=True, timeout=300
    )


def test_sweep_prints_a_pasteable_compare_command(tmp_path: Path):
    experiment = "x'; touch PWNED; echo '$(touch PWNED2) `touch PWNED3`"
    output_dir = "runs/a b$(touch PWNED4)"
    (tmp_path / "exp.yaml").write_text(
        "data: {train: shards/train, val: shards/val, crop: 32}\nmodel: {arch: resnet18}\n"
        f"output_dir: {json_str(output_dir)}\nmlflow: {{experiment: {json_str(experiment)}}}\n"
    )
    proc = _script("sweep.sh", "--dry-run", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    prefix = "compare when done: "
    assert last.startswith(prefix)
    command = last[len(prefix) :]
    uri = f"sqlite:///{tmp_path}/{output_dir}/mlflow.db"
    assert shlex.split(command) == ["unmix", "compare", "--tracking-uri", uri, "--experiment", experiment]
    # pasted into bash (with `unmix` a function that prints its arguments): the same words, nothing run
    pasted = subprocess.run(
        ["bash", "-c", 'unmix() { printf "%s\\n" "$@"; }\n' + command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert pasted.stdout.splitlines() == ["compare", "--tracking-uri", uri, "--experiment", experiment]
    assert not list(tmp_path.glob("PWNED*"))


def json_str(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(text)


def test_a_line_break_in_a_config_value_cannot_forge_keys(tmp_path: Path):
    (tmp_path / "exp.yaml").write_text(
        "data: {train: shards/train, val: shards/val, crop: 32}\noutput_dir: runs/x\n"
        f"mlflow: {{experiment: {json_str('e' + chr(10) + 'output_dir=/etc')}}}\n"
    )
    proc = _script("submit.sh", "--dry-run", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "sbatch" not in proc.stdout
    assert "mlflow.experiment" in proc.stderr and "line break" in proc.stderr


def test_percent_in_output_dir_reaches_slurm_as_a_literal(tmp_path: Path):
    (tmp_path / "exp.yaml").write_text(
        "data: {train: shards/train, val: shards/val, crop: 32}\nmodel: {arch: resnet18}\n"
        "output_dir: runs/100%_j\n"
    )
    proc = _script("submit.sh", "--dry-run", "--cpu", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines() if "sbatch" in line]
    assert len(commands) == 2
    for cmd in commands:
        assert f"--output={tmp_path}/runs/100%%_j/slurm-%x-%j.out" in cmd
    assert commands[1][-3] == f"{tmp_path}/runs/100%_j"  # the job itself gets the real directory
    (tmp_path / "exp.yaml").write_text(
        'data: {train: shards/train, val: shards/val, crop: 32}\noutput_dir: "runs/a\\\\b"\n'
    )
    proc = _script("submit.sh", "--dry-run", "exp.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    _one_line(proc.stderr, "holds a backslash")


def _linear_sbatch_with_stand_ins(tmp_path: Path, srun: str, env: dict[str, str]) -> Path:
    """Run slurm/linear.sbatch as a plain script, ``srun`` a stand-in shell body (``$ARGS_OUT``: a file
    for it to write) and ``unmix`` one that succeeds; returns ``$ARGS_OUT``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun}\n")
    (bin_dir / "unmix").write_text("#!/bin/bash\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "backbone.pt").write_bytes(b"")
    args_out = tmp_path / "args"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ARGS_OUT": str(args_out),
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "node1",
        **env,
    }
    proc = _script("linear.sbatch", str(out_dir), "train", "val", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    return args_out


def test_linear_sbatch_runs_the_sgd_probe_then_logreg_then_knn(tmp_path: Path):
    """The default UNMIX_EVAL: `unmix linear protocol=moco` with the user's linear args (``unmix linear``
    alone would run logreg, the default probe), then protocol=logreg with only the shared data keys,
    then kNN: one srun each."""
    env = {"UNMIX_LINEAR_ARGS": "device=cpu features=augmented"}
    args_out = _linear_sbatch_with_stand_ins(tmp_path, 'echo "$*" >> "$ARGS_OUT"', env)
    sgd, logreg, knn = (line.split() for line in args_out.read_text().splitlines())
    assert sgd[sgd.index("unmix") + 1] == "linear"
    assert sgd[-3:] == ["protocol=moco", "device=cpu", "features=augmented"]
    assert logreg[logreg.index("unmix") + 1] == "linear" and "protocol=logreg" in logreg
    assert "device=cpu" in logreg and "features=augmented" not in logreg
    assert knn[knn.index("unmix") + 1] == "knn"
    assert [w for w in sgd + logreg + knn if w.endswith(".json")] == [
        f"{tmp_path}/run/eval/{name}.json" for name in ("linear", "logreg", "knn")
    ]


@pytest.mark.parametrize("kind", ["linear", "knn"])
def test_linear_sbatch_never_globs_the_users_args(tmp_path: Path, kind: str):
    """linear.sbatch run as a plain script with stand-ins for srun and unmix: the words of UNMIX_*_ARGS
    reach the command as written (``lr=*`` would otherwise become the names of files in the job's cwd)."""
    (tmp_path / "lr=0.5").write_text("a file the glob would match")
    env = {"UNMIX_EVAL": kind, f"UNMIX_{kind.upper()}_ARGS": "  lr=*   epochs=[0-9]  "}
    srun = 'for a in "$@"; do printf "%s\\n" "$a"; done > "$ARGS_OUT"'
    args_out = _linear_sbatch_with_stand_ins(tmp_path, srun, env)
    args = args_out.read_text().splitlines()
    assert args[-2:] == ["lr=*", "epochs=[0-9]"] and "lr=0.5" not in args
