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
        tags={
            "unmix.kind": "linear_eval",
            "unmix.eval": "linear",
            "unmix.pretrain_run_id": b,
            "unmix.protocol": "moco",
        },
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
    # the raw-pixel floor: a linear (logistic regression) and a kNN evaluation
    for kind, metric, value in (("linear", "linear_top1", 88.0), ("knn", "knn_top1", 70.0)):
        r = c.create_run(
            exp,
            run_name=f"pixels-{kind}",
            tags={
                "unmix.kind": "pixels",
                "unmix.eval": kind,
                "unmix.protocol": "logreg" if kind == "linear" else "knn",
            },
        )
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
    assert set(by_name) == {"moco", "moco_unmix", "byol_unmix", "random-init resnet18", "raw pixels"}

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
    pixels = by_name["raw pixels"]  # kNN floor beside the linear one, with the linear number's protocol
    assert (pixels.kind, pixels.linear_top1, pixels.knn_top1, pixels.protocol) == (
        "pixels",
        88.0,
        70.0,
        "logreg",
    )
    assert len(comp.pairs) == 1 and comp.pairs[0]["gain_linear_top1"] == pytest.approx(2.5)

    # CLI: JSON
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {r["run_id"]: r for r in data["rows"]}
    assert rows[ids["moco_unmix"]]["linear_top1"] == 62.5 and rows[ids["moco"]]["knn_top1"] == 50.0
    assert data["pairs"][0]["on_run_ids"] == [ids["moco_unmix"]]
    assert data["pairs"][0]["gain_linear_top1_verdict"] == "1 seed: no interval"
    assert rows[ids["moco_unmix"]]["protocol"] == "moco"  # the tag of the eval run that made the number
    assert rows[ids["moco"]]["protocol"] == "?"  # linear_top1 on the run, no eval run: unknown
    groups = {(g["setting"], g["unmix"]): g for g in data["groups"]}
    assert groups[("moco_v2 resnet18 200ep b256", "on")]["n"] == 1

    # CLI: CSV, Markdown, table
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "csv"]) == 0
    csv_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(csv_rows) == 5 and {r["name"] for r in csv_rows} == set(by_name)
    assert main(["compare", "--experiment", "cmp", "--tracking-uri", uri, "--format", "markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | name | method | unmix") and md.index("") == 2 + 5
    assert "**seed groups (mean ± std over seeds)**" in md
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
    assert names == {"moco", "moco_unmix", "random-init resnet18", "raw pixels"}

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


def test_protocol_marks_heads_trained_on_augmented_features():
    from types import SimpleNamespace

    def run(tags, params):
        return SimpleNamespace(data=SimpleNamespace(tags=tags, params=params))

    tag = {"unmix.protocol": "moco"}
    assert compare.protocol_of(run(tag, {"features": "cached"})) == "moco"
    assert compare.protocol_of(run(tag, {"features": "augmented"})) == "moco+aug"
    assert compare.protocol_of(run({}, {"protocol": "byol", "features": "augmented"})) == "byol+aug"
    assert compare.protocol_of(run({}, {})) == "?"


# ------------------------------------------------------------------------------------ seeds and noise


def _run(rid: str, seed: int | None, unmix: bool, knn: float, linear: float | None = None, **params):
    """A pretraining run as MLflow returns it (only the fields compare reads)."""
    from types import SimpleNamespace

    p = {"model.arch": "resnet10", "optim.epochs": "5", "optim.batch_size": "64", "optim.lr": "0.06"}
    p.update({"unmix.enabled": str(unmix).lower(), "output_dir": f"runs/{rid}", "mlflow.run_name": rid})
    p.update({k.replace("__", "."): str(v) for k, v in params.items()})
    if seed is not None:
        p["seed"] = str(seed)
    metrics = {"knn_top1": knn} | ({} if linear is None else {"linear_top1": linear})
    return SimpleNamespace(
        info=SimpleNamespace(run_id=rid, run_name=rid, start_time=0, end_time=1000, status="FINISHED"),
        data=SimpleNamespace(tags={"method": "moco_v2"}, params=p, metrics=metrics),
    )


def _rows(runs):
    return [compare.pretrain_row(r, "e", [], 1000.0) for r in runs]


def test_t_quantile_equals_scipy():
    from scipy import stats

    for df in (1, 2, 3, 4, 5, 9, 30, 200):
        for p in (0.9, 0.975, 0.995):
            assert compare.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-7, abs=1e-7)


@pytest.mark.parametrize(
    "diffs", [[1.0, 2.0, 3.0], [0.5, -0.2, 0.1, 0.3, -0.4], [2.0, 2.1, 1.9, 2.05, 1.95, 2.0], [-3.0, -2.5]]
)
def test_paired_gain_equals_the_t_interval_of_scipy(diffs):
    import numpy as np
    from scipy import stats

    g = compare.paired_gain(diffs)
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert (g["n"], g["mean"]) == (len(diffs), pytest.approx(np.mean(diffs)))
    assert (g["lo"], g["hi"]) == (pytest.approx(lo, rel=1e-6), pytest.approx(hi, rel=1e-6))
    expected = "within noise" if lo <= 0 <= hi else ("Un-Mix better" if lo > 0 else "Un-Mix worse")
    assert g["verdict"] == expected


def test_paired_gain_one_pair_has_no_interval():
    assert compare.paired_gain([1.5]) == {
        "n": 1,
        "mean": 1.5,
        "lo": None,
        "hi": None,
        "verdict": "1 seed: no interval",
    }
    assert compare.paired_gain([])["verdict"] == "no seed pairs"


def test_groups_and_seed_pairs_against_a_naive_reference():
    import numpy as np

    off = {0: 60.0, 1: 64.0, 2: 58.0, 3: 61.0}
    on = {0: 62.0, 1: 63.5, 2: 61.0, 4: 70.0}  # seed 3 only off, seed 4 only on: unpaired
    runs = [_run(f"off{s}", s, False, v) for s, v in off.items()] + [
        _run(f"on{s}", s, True, v) for s, v in on.items()
    ]
    runs.insert(0, _run("off0-newer", 0, False, 59.0))  # newest first: this one counts for seed 0
    runs.append(_run("lr", 0, True, 99.0, optim__lr=0.1))  # another setting: its own group, never paired
    runs.append(_run("threads", 5, True, 65.0, data__threads=8))  # bookkeeping param: same setting
    rows = _rows(runs)
    groups = compare.group_rows(rows)
    pairs = compare.pair_rows(rows)
    by = {(g.setting, g.unmix): g for g in groups}
    base = "moco_v2 resnet10 5ep b64"
    g_off, g_on, g_lr = by[(base, "off")], by[(base, "on")], by[(base + "#2", "on")]
    off[0] = 59.0
    assert g_off.seeds == [0, 1, 2, 3] and g_off.run_ids[0] == "off0-newer"
    assert g_off.knn_top1_mean == pytest.approx(np.mean(list(off.values())))
    assert g_off.knn_top1_std == pytest.approx(np.std(list(off.values()), ddof=1))
    assert g_on.seeds == [0, 1, 2, 4, 5] and g_on.n == 5
    assert (g_lr.n, g_lr.knn_top1_std) == (1, None)
    assert g_off.linear_top1_mean is None and g_off.linear_top1_n == 0

    (pair,) = pairs
    assert pair["seeds"] == [0, 1, 2] and pair["setting"] == base
    diffs = [on[s] - off[s] for s in (0, 1, 2)]
    assert pair["gain_knn_top1"] == pytest.approx(np.mean(diffs))
    assert pair["gain_knn_top1_n"] == 3 and pair["gain_linear_top1_verdict"] == "no seed pairs"
    by_id = {r.run_id: r for r in rows}
    assert by_id["on1"].paired_with == "off1" and by_id["on1"].gain_knn_top1 == pytest.approx(-0.5)
    assert by_id["on4"].paired_with is None and by_id["off3"].paired_with is None


def test_within_noise_is_said_when_the_interval_holds_zero():
    within = [_run(f"a{s}", s, False, 60.0 + s) for s in range(3)] + [
        _run(f"b{s}", s, True, 60.0 + s + d) for s, d in zip(range(3), (2.0, -1.0, 0.5), strict=True)
    ]
    comp = compare.Comparison(rows=_rows(within), pairs=[], eval_runs={})
    comp.groups, comp.pairs = compare.group_rows(comp.rows), compare.pair_rows(comp.rows)
    text = compare.render(comp)
    assert "within noise" in text and "+0.50 [" in text
    assert "61.00 ± 1.00" in text  # knn mean ± std of seeds 0, 1, 2 without Un-Mix

    clear = [_run(f"a{s}", s, False, 60.0 + s) for s in range(3)] + [
        _run(f"b{s}", s, True, 63.0 + s + d) for s, d in zip(range(3), (0.1, -0.1, 0.0), strict=True)
    ]
    comp = compare.Comparison(rows=_rows(clear), pairs=[], eval_runs={})
    comp.groups, comp.pairs = compare.group_rows(comp.rows), compare.pair_rows(comp.rows)
    assert comp.pairs[0]["gain_knn_top1_verdict"] == "Un-Mix better"
    assert "within noise" not in compare.render(comp, "markdown")
