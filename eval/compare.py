"""``unmix compare``: pretraining runs side by side, from any MLflow tracking store (SQLite or server).

What a pretraining run must carry (the trainer sets these):

- tag ``unmix.kind`` = ``pretrain`` (how runs are found), tag ``method`` (``moco_v2`` | ``byol``), tag
  ``unmix`` = ``on`` | ``off`` (``true``/``false``/``1``/``0`` accepted; param ``unmix.enabled`` is the
  fallback);
- params ``model.arch``, ``optim.epochs``, ``optim.batch_size`` (the global batch);
- metrics ``loss`` (per step, plotted), ``images_per_s`` (latest value shown);
- metrics written by ``unmix linear``/``unmix knn``: ``linear_top1``, ``linear_top5``, ``knn_top1``.

Evaluation runs (tag ``unmix.pretrain_run_id``) fill in accuracies the pretraining run lacks and give
the val-accuracy curves of the plot. Random-init evaluations (tag ``unmix.kind`` = ``random_init``,
``random_init`` = ARCH) become one floor row per architecture; pixel evaluations (``unmix linear
--pixels``: tag ``unmix.kind`` = ``pixels``) one "raw pixels" floor row.

Rows whose (method, arch, epochs, batch) agree and whose Un-Mix flag differs are paired; the Un-Mix
row shows the gain (on - off) in linear top-1 and kNN top-1.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

KIND_TAG = "unmix.kind"
PRETRAIN_KIND = "pretrain"
RANDOM_INIT_KIND = "random_init"
PIXELS_KIND = "pixels"
PRETRAIN_RUN_TAG = "unmix.pretrain_run_id"
PAIR_FIELDS = ("method", "arch", "epochs", "batch_size")
FORMATS = ("table", "markdown", "csv", "json")


@dataclass
class Row:
    """One line of the comparison."""

    run_id: str
    name: str
    experiment: str
    kind: str  # "pretrain" | "random_init" | "pixels"
    method: str | None
    unmix: str | None  # "on" | "off" | None
    arch: str | None
    epochs: int | None
    batch_size: int | None
    linear_top1: float | None
    linear_top5: float | None
    knn_top1: float | None
    images_per_s: float | None
    duration_s: float | None
    status: str
    paired_with: str | None = None
    gain_linear_top1: float | None = None
    gain_knn_top1: float | None = None


def _flag(value: Any) -> str | None:
    if value is None:
        return None
    v = str(value).strip().lower()
    if v in ("on", "true", "1", "yes"):
        return "on"
    if v in ("off", "false", "0", "no", "none"):
        return "off"
    return v


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def search_all(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    """Every run matching ``filter_string`` in the experiments (all pages), newest first."""
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=1000,
            order_by=["attributes.start_time DESC"],
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def run_kind(run: Any) -> str | None:
    """``pretrain``, ``random_init``, another ``unmix.kind`` tag value, or None.

    A run without ``unmix.kind`` that carries the trainer's ``method`` tag and an Un-Mix flag (tag
    ``unmix`` or param ``unmix.enabled``) counts as a pretraining run too.
    """
    tags = run.data.tags
    kind = tags.get(KIND_TAG)
    if kind is None and "method" in tags and ("unmix" in tags or "unmix.enabled" in run.data.params):
        return PRETRAIN_KIND
    return kind


def _duration(run: Any, now_ms: float) -> float | None:
    start, end = run.info.start_time, run.info.end_time
    if start is None:
        return None
    return ((end if end else now_ms) - start) / 1000.0


def _eval_metric(eval_runs: Iterable[Any], key: str) -> float | None:
    for er in eval_runs:  # newest first
        if key in er.data.metrics:
            return er.data.metrics[key]
    return None


def pretrain_row(run: Any, experiment: str, eval_runs: list[Any], now_ms: float) -> Row:
    """A pretraining run's row; accuracies missing on the run come from its newest eval runs."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics

    def metric(key: str) -> float | None:
        return metrics[key] if key in metrics else _eval_metric(eval_runs, key)

    return Row(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", ""),
        experiment=experiment,
        kind=PRETRAIN_KIND,
        method=tags.get("method") or params.get("method"),
        unmix=_flag(tags.get("unmix", params.get("unmix.enabled"))),
        arch=params.get("model.arch"),
        epochs=_int(params.get("optim.epochs")),
        batch_size=_int(params.get("optim.batch_size")),
        linear_top1=metric("linear_top1"),
        linear_top5=metric("linear_top5"),
        knn_top1=metric("knn_top1"),
        images_per_s=metrics.get("images_per_s"),
        duration_s=_duration(run, now_ms),
        status=run.info.status,
    )


def floor_rows(
    random_runs: list[Any], experiment_names: dict[str, str], now_ms: float, kind: str = RANDOM_INIT_KIND
) -> list[Row]:
    """One row per architecture from the newest random-init linear and kNN evaluations; with
    ``kind="pixels"``, one "raw pixels" row from the newest pixel evaluations."""
    by_arch: dict[str, list[Any]] = {}
    for run in random_runs:  # newest first
        if kind == PIXELS_KIND:
            arch = "pixels"
        else:
            arch = run.data.tags.get("random_init") or run.data.params.get("model.arch") or "?"
        by_arch.setdefault(arch, []).append(run)
    rows = []
    for arch, runs in sorted(by_arch.items()):
        newest = runs[0]
        rows.append(
            Row(
                run_id=newest.info.run_id,
                name="raw pixels" if kind == PIXELS_KIND else f"random-init {arch}",
                experiment=experiment_names.get(newest.info.experiment_id, newest.info.experiment_id),
                kind=kind,
                method="pixels" if kind == PIXELS_KIND else "random-init",
                unmix=None,
                arch=arch,
                epochs=0,
                batch_size=None,
                linear_top1=_eval_metric(runs, "linear_top1"),
                linear_top5=_eval_metric(runs, "linear_top5"),
                knn_top1=_eval_metric(runs, "knn_top1"),
                images_per_s=None,
                duration_s=None,
                status=newest.info.status,
            )
        )
    return rows


def pair_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Pair pretraining rows that differ only in Un-Mix; sets the gain on the Un-Mix row; returns the pairs.

    With several runs for one key and flag, the first (newest) is used.
    """
    groups: dict[tuple, dict[str, Row]] = {}
    for row in rows:
        if row.kind != PRETRAIN_KIND or row.unmix not in ("on", "off"):
            continue
        groups.setdefault(tuple(getattr(row, f) for f in PAIR_FIELDS), {}).setdefault(row.unmix, row)
    pairs = []
    for key, g in groups.items():
        if "on" not in g or "off" not in g:
            continue
        on, off = g["on"], g["off"]
        on.paired_with, off.paired_with = off.run_id, on.run_id
        on.gain_linear_top1 = _diff(on.linear_top1, off.linear_top1)
        on.gain_knn_top1 = _diff(on.knn_top1, off.knn_top1)
        pairs.append(
            {
                **dict(zip(PAIR_FIELDS, key, strict=True)),
                "off_run_id": off.run_id,
                "on_run_id": on.run_id,
                "linear_top1_off": off.linear_top1,
                "linear_top1_on": on.linear_top1,
                "gain_linear_top1": on.gain_linear_top1,
                "linear_top5_off": off.linear_top5,
                "linear_top5_on": on.linear_top5,
                "gain_linear_top5": _diff(on.linear_top5, off.linear_top5),
                "knn_top1_off": off.knn_top1,
                "knn_top1_on": on.knn_top1,
                "gain_knn_top1": on.gain_knn_top1,
            }
        )
    return pairs


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass
class Comparison:
    rows: list[Row]
    pairs: list[dict[str, Any]]
    eval_runs: dict[str, list[Any]]  # pretraining run id -> its eval runs, newest first


def collect(
    tracking_uri: str | None = None, experiment: str | None = None, run_ids: list[str] | None = None
) -> Comparison:
    """Read the runs to compare from the tracking store.

    ``run_ids``: exactly these pretraining runs; else every pretraining run (:func:`run_kind`) in
    ``experiment`` (or in all active experiments). Floor rows come from the same experiments.
    """
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    now_ms = time.time() * 1000
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"--experiment {experiment!r}: no such experiment in {client.tracking_uri}")
        exps = [exp]
    else:
        exps = client.search_experiments(view_type=ViewType.ACTIVE_ONLY)
    names = {e.experiment_id: e.name for e in exps}
    if run_ids:
        pretrain = []
        for rid in run_ids:
            try:
                run = client.get_run(rid)
            except Exception as exc:
                raise ValueError(f"--runs {rid}: not found in {client.tracking_uri} ({exc})") from exc
            pretrain.append(run)
            if run.info.experiment_id not in names:
                names[run.info.experiment_id] = client.get_experiment(run.info.experiment_id).name
        exp_ids = sorted({r.info.experiment_id for r in pretrain})
        everything = search_all(client, exp_ids, "")
    else:
        exp_ids = list(names)
        everything = search_all(client, exp_ids, "") if exp_ids else []
        pretrain = [r for r in everything if run_kind(r) == PRETRAIN_KIND]
    evals: dict[str, list[Any]] = {}
    for er in everything:
        if er.data.tags.get(PRETRAIN_RUN_TAG):
            evals.setdefault(er.data.tags[PRETRAIN_RUN_TAG], []).append(er)
    random_runs = [r for r in everything if run_kind(r) == RANDOM_INIT_KIND]
    rows = [
        pretrain_row(
            r, names.get(r.info.experiment_id, r.info.experiment_id), evals.get(r.info.run_id, []), now_ms
        )
        for r in pretrain
    ]
    # pairs next to each other (off before on), then the floor rows
    rows.sort(key=lambda r: (r.method or "", r.arch or "", r.epochs or 0, r.batch_size or 0, r.unmix == "on"))
    rows += floor_rows(random_runs, names, now_ms)
    pixel_runs = [r for r in everything if run_kind(r) == PIXELS_KIND]
    rows += floor_rows(pixel_runs, names, now_ms, kind=PIXELS_KIND)
    pairs = pair_rows(rows)
    return Comparison(rows=rows, pairs=pairs, eval_runs=evals)


_COLUMNS = [  # (header, Row attribute, format)
    ("run", "run_id", "id"),
    ("name", "name", "s"),
    ("method", "method", "s"),
    ("unmix", "unmix", "s"),
    ("arch", "arch", "s"),
    ("epochs", "epochs", "d"),
    ("batch", "batch_size", "d"),
    ("lin top1", "linear_top1", ".2f"),
    ("lin top5", "linear_top5", ".2f"),
    ("knn top1", "knn_top1", ".2f"),
    ("gain lin top1", "gain_linear_top1", "+.2f"),
    ("gain knn top1", "gain_knn_top1", "+.2f"),
    ("img/s", "images_per_s", ".1f"),
    ("duration", "duration_s", "dur"),
    ("status", "status", "s"),
]


def _cell(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "-"
    if fmt == "id":
        return str(value)[:8]
    if fmt == "dur":
        s = int(value)
        return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
    if fmt == "s":
        return str(value)
    return format(value, fmt)


def render(comp: Comparison, fmt: str = "table") -> str:
    """The comparison as an aligned text table, Markdown, CSV or JSON."""
    if fmt == "json":
        return json.dumps({"rows": [asdict(r) for r in comp.rows], "pairs": comp.pairs}, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=[f.name for f in fields(Row)], lineterminator="\n")
        writer.writeheader()
        for r in comp.rows:
            writer.writerow(asdict(r))
        return buf.getvalue()
    header = [h for h, _, _ in _COLUMNS]
    body = [[_cell(getattr(r, attr), f) for _, attr, f in _COLUMNS] for r in comp.rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines) + "\n"
    if fmt != "table":
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    lines = [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    ]
    if not comp.rows:
        lines.append("(no runs tagged unmix.kind=pretrain, random_init or pixels)")
    return "\n".join(lines) + "\n"


def knn_curve(client: Any, run_id: str) -> tuple[list[int], list[float]]:
    """The kNN monitor's ``knn_top1`` of a pretraining run by optimizer step (latest value per step).

    ``unmix knn`` logs its result onto the pretraining run at step 0; that point is not part of the curve.
    """
    latest = {}
    for m in sorted(client.get_metric_history(run_id, "knn_top1"), key=lambda m: (m.step, m.timestamp)):
        if m.step > 0:
            latest[m.step] = m.value
    return list(latest), list(latest.values())


def plot(comp: Comparison, path: str | Path, tracking_uri: str | None = None) -> Path:
    """PNG of the rows' runs: pretraining loss per step, linear-eval val top-1 per epoch, and the kNN
    monitor's ``knn_top1`` per pretraining step (``eval.knn_every_epochs``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, (ax_loss, ax_eval, ax_knn) = plt.subplots(1, 3, figsize=(18, 4.5))
    for row in comp.rows:
        if row.kind != PRETRAIN_KIND:
            continue
        label = f"{row.name or row.run_id[:8]} ({row.method}, unmix {row.unmix})"
        hist = sorted(client.get_metric_history(row.run_id, "loss"), key=lambda m: m.step)
        if hist:
            ax_loss.plot([m.step for m in hist], [m.value for m in hist], label=label)
        steps, values = knn_curve(client, row.run_id)
        if steps:
            ax_knn.plot(steps, values, marker=".", label=label)
        linear_runs = [
            er for er in comp.eval_runs.get(row.run_id, []) if er.data.tags.get("unmix.eval") == "linear"
        ]
        if linear_runs:
            ev = sorted(
                client.get_metric_history(linear_runs[0].info.run_id, "val_top1"), key=lambda m: m.step
            )
            if ev:
                ax_eval.plot([m.step for m in ev], [m.value for m in ev], marker="o", label=label)
    for row in comp.rows:
        if row.kind == RANDOM_INIT_KIND and row.linear_top1 is not None:
            ax_eval.axhline(row.linear_top1, linestyle="--", color="grey", label=f"random-init {row.arch}")
    ax_loss.set(title="pretraining loss", xlabel="step", ylabel="loss")
    ax_eval.set(title="linear evaluation", xlabel="epoch", ylabel="val top-1 (%)")
    ax_knn.set(title="kNN monitor (pretraining)", xlabel="step", ylabel="kNN top-1 (%)")
    for ax in (ax_loss, ax_eval, ax_knn):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    from unmix.training.atomic import replacing

    path = Path(path)
    with replacing(path) as tmp:  # temporary file + rename (atomic)
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return path
