"""``unmix compare`` against a real SQLite tracking store and a real ``mlflow server`` on a loopback port."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from unmix.cli import main
from unmix.eval import compare

# the venv's `mlflow` script when there is one (what users run), else the same CLI through the interpreter
_SCRIPT = Path(sys.executable).with_name("mlflow")
MLFLOW = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "mlflow"]


def populate(uri: str, experiment: str = "cmp") -> dict[str, str]:
    """Runs as the trainer and the eval commands write them; returns name -> run id."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    exp = c.create_experiment(experiment)
    ids: dict[str, str] = {}

    def pretrain(name, tags, params, metrics, losses, finish=True):
        run = c.create_run(exp, run_name=name, tags=tags)
        rid = run.info.run_id
        for k, v in params.items():
            c.log_param(rid, k, v)
        for step, loss in enumerate(losses):
            c.log_metric(rid, "loss", loss, step=step)
        for k, v in metrics.items():
            c.log_metric(rid, k, v)
        if finish:
            c.set_terminated(rid, "FINISHED")
        ids[name] = rid
        return rid

    common = {"model.arch": "resnet18", "optim.epochs": "200", "optim.batch_size": "256"}
    # explicit kind tag, Un-Mix off
    pretrain(
        "moco",
        {"unmix.kind": "pretrain", "method": "moco_v2", "unmix": "off"},
        common,
        {"linear_top1": 60.0, "linear_top5": 80.0, "knn_top1": 50.0, "images_per_s": 100.0},
        [5.0, 4.0, 3.5],
    )
    # the trainer's own tags (no kind tag, unmix "true"); its linear top-5 only on its eval run
    b = pretrain(
        "moco_unmix",
        {"method": "moco_v2", "unmix": "true"},
        common,
        {"linear_top1": 62.5, "knn_top1": 53.0, "images_per_s": 95.0},
        [5.5, 4.4, 3.9],
    )
    # unpaired and still running
    pretrain(
        "byol_unmix",
        {"unmix.kind": "pretrain", "method": "byol", "unmix": "on"},
        {**common, "optim.epochs": "100"},
        {"images_per_s": 80.0},
        [1.0, 0.5],
        finish=False,
    )
    # a linear eval run of moco_unmix with its per-epoch curve
    ev = c.create_run(
        exp,
        run_name="linear",
        tags={"unmix.kind": "linear_eval", "unmix.eval": "linear", "unmix.pretrain_run_id": b},
    )
    for epoch, acc in enumerate([40.0, 55.0, 62.5], start=1):
        c.log_metric(ev.info.run_id, "val_top1", acc, step=epoch)
    c.log_metric(ev.info.run_id, "linear_top5", 84.0)
    c.set_terminated(ev.info.run_id, "FINISHED")
    # the floor: random-init linear and kNN evaluations
    for kind, metric, value in (("linear", "linear_top1", 10.0), ("knn", "knn_top1", 12.0)):
        r = c.create_run(
            exp,
            run_name=f"rand-{kind}",
            tags={"unmix.kind": "random_init", "random_init": "resnet18", "unmix.eval": kind},
        )
        c.log_param(r.info.run_id, "model.arch", "resnet18")
        c.log_metric(r.info.run_id, metric, value)
        c.set_terminated(r.info.run_id, "FINISHED")
    # unrelated run: ignored
    c.set_terminated(c.create_run(exp, run_name="other").info.run_id, "FINISHED")
    return ids


def check_store(uri: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ids = populate(uri)
    capsys.readouterr()  # MLflow prints "View run ... at" links when runs end on a server
    comp = compare.collect(uri, experiment="cmp")
    by_name = {r.name: r for r in comp.rows}
    assert set(by_name) == {"moco", "moco_unmix", "byol_unmix", "random-init resnet18"}

    off, on, byol, floor = (by_name[n] for n in ("moco", "moco_unmix", "byol_unmix", "random-init resnet18"))
    assert (off.method, off.unmix, off.arch, off.epochs, off.batch_size) == (
        "moco_v2",
        "off",
        "resnet18",
        200,
        256,
    )
    assert on.unmix == "on" and on.linear_top5 == 84.0  # filled from the eval run
    assert on.paired_with == ids["moco"] and off.paired_with == ids["moco_unmix"]
    assert on.gain_linear_top1 == pytest.approx(2.5) and on.gain_knn_top1 == pytest.approx(3.0)
    assert off.gain_linear_top1 is None
    assert byol.paired_with is None and byol.status == "RUNNING" and byol.epochs == 100
    assert off.status == "FINISHED" and off.duration_s is not None and off.images_per_s == 100.0
    assert (floor.kind, floor.linear_top1, floor.knn_top1) == ("random_init", 10.0, 12.0)
    assert len(comp.pairs) == 1 and comp.pairs[0]["gain_linear_top1"] == pytest.approx(2.5)

    # CLI: JSON
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["run_id"]: r for r in data["rows"]}
    assert rows[ids["moco_unmix"]]["linear_top1"] == 62.5 and rows[ids["moco"]]["knn_top1"] == 50.0
    assert data["pairs"][0]["on_run_id"] == ids["moco_unmix"]

    # CLI: CSV, Markdown, table
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "csv"]) == 0
    csv_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(csv_rows) == 4 and {r["name"] for r in csv_rows} == set(by_name)
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | name | method | unmix") and len(md) == 2 + 4
    assert any("+2.50" in line and "moco_unmix" in line for line in md)
    plot = tmp_path / "plots" / "cmp.png"
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--plot", str(plot)]) == 0
    table = capsys.readouterr().out
    assert "moco_unmix" in table and "random-init resnet18" in table
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --runs selects exactly those pretraining runs (plus the floor of their experiment)
    assert (
        main(["compare", "--runs", ids["moco"], ids["moco_unmix"], "--tracking-uri", uri, "--format", "json"])
        == 0
    )
    names = {r["name"] for r in json.loads(capsys.readouterr().out)["rows"]}
    assert names == {"moco", "moco_unmix", "random-init resnet18"}

    # errors name what is wrong
    assert main(["compare", "--experiment", "nope", "--tracking-uri", uri]) == 2
    assert "'nope'" in capsys.readouterr().err


def test_compare_sqlite_store(tmp_path, capsys):
    check_store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path, capsys)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on a free loopback port; always stopped at teardown."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen(
        [
            *MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow server exited with {proc.returncode}: "
                    f"{(tmp_path / 'server.log').read_text()[-2000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"mlflow server not healthy after 180 s: {(tmp_path / 'server.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        yield url
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn/gunicorn workers)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_compare_mlflow_server(mlflow_server, tmp_path, capsys):
    check_store(mlflow_server, tmp_path, capsys)


def test_knn_curve_is_the_monitor_by_step():
    from types import SimpleNamespace

    hist = [
        SimpleNamespace(step=s, timestamp=t, value=v)
        for s, t, v in [(20, 2, 30.0), (0, 5, 55.0), (10, 1, 20.0)]
    ]
    hist.append(SimpleNamespace(step=20, timestamp=3, value=31.0))  # a re-logged step (resume): the latest
    client = SimpleNamespace(get_metric_history=lambda run_id, key: hist if key == "knn_top1" else [])
    assert compare.knn_curve(client, "r") == ([10, 20], [20.0, 31.0])  # step 0 (`unmix knn`) left out
