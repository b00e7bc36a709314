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

Seeds: runs whose configuration (the params the trainer logs) differs only in ``seed`` (and in keys that
do not change the result: ``output_dir``, ``mlflow.*``, ``checkpoint.*``, ``log.*``, ``data.threads``,
``model.channels_last``) form a group; each group shows n, mean and standard deviation. Two groups that
differ only in the Un-Mix flag are paired: the Un-Mix gain is the mean of the seed-paired differences
(on - off, same seed) with a 95 % Student-t interval, "within noise" when the interval holds 0. One seed
pair gives a difference but no interval. Per run, the row of the Un-Mix run shows its difference to the
run of the same seed without Un-Mix.

Protocols: each linear top-1 says which protocol made it (tag ``unmix.protocol`` of the evaluation run:
``logreg`` | ``moco`` | ``byol`` | ``knn``; older runs: param ``protocol`` or ``name``; else ``?``), with
``+aug`` when the head trained on augmented features (``features=augmented``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

KIND_TAG = "unmix.kind"
PRETRAIN_KIND = "pretrain"
RANDOM_INIT_KIND = "random_init"
PIXELS_KIND = "pixels"
PRETRAIN_RUN_TAG = "unmix.pretrain_run_id"
PROTOCOL_TAG = "unmix.protocol"
PAIR_FIELDS = ("method", "arch", "epochs", "batch_size")
FORMATS = ("table", "markdown", "csv", "json")
# params that never change a run's result: runs differing only in these (and seed) are one setting
NOT_SETTING = ("seed", "output_dir", "data.threads", "model.channels_last")
NOT_SETTING_PREFIXES = ("mlflow.", "checkpoint.", "log.")
UNMIX_PARAM = "unmix.enabled"
GAIN_METRICS = ("linear_top1", "knn_top1")


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
    seed: int | None = None
    protocol: str | None = None  # what made linear_top1: logreg | moco | byol | knn | ?
    setting: str | None = None  # the group label (pretraining rows)
    paired_with: str | None = None  # the run of the same seed with the other Un-Mix flag
    gain_linear_top1: float | None = None
    gain_knn_top1: float | None = None
    setting_key: tuple = ()  # params that define the setting (not rendered)


@dataclass
class Group:
    """Runs of one setting and one Un-Mix flag that differ only in seed (newest run per seed)."""

    setting: str
    method: str | None
    unmix: str | None
    arch: str | None
    epochs: int | None
    batch_size: int | None
    n: int
    seeds: list
    run_ids: list
    linear_top1_mean: float | None = None
    linear_top1_std: float | None = None
    linear_top1_n: int = 0
    knn_top1_mean: float | None = None
    knn_top1_std: float | None = None
    knn_top1_n: int = 0


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


def protocol_of(run: Any) -> str:
    """Which protocol an evaluation run used: tag ``unmix.protocol``, else param ``protocol``/``name``,
    else ``?`` (runs from before the tag existed); ``+aug`` when its head trained on augmented features
    (param ``features=augmented``), which reads lower than the cached features every other probe uses."""
    tags, params = run.data.tags, run.data.params
    name = tags.get(PROTOCOL_TAG) or params.get("protocol") or params.get("name") or "?"
    return f"{name}+aug" if params.get("features") == "augmented" else name


def _linear_protocol(eval_runs: Iterable[Any]) -> str | None:
    """The protocol of the newest evaluation run carrying ``linear_top1``, else of the newest linear
    evaluation (``unmix linear`` also logs its result onto the pretraining run); None: neither."""
    eval_runs = list(eval_runs)
    for er in eval_runs:  # newest first
        if "linear_top1" in er.data.metrics:
            return protocol_of(er)
    for er in eval_runs:
        if er.data.tags.get("unmix.eval") == "linear":
            return protocol_of(er)
    return None


def setting_key(params: dict[str, str], method: str | None) -> tuple:
    """The params that define what a run computes, less the seed, the Un-Mix flag and bookkeeping."""
    keep = {
        k: v
        for k, v in params.items()
        if k not in NOT_SETTING and k != UNMIX_PARAM and not k.startswith(NOT_SETTING_PREFIXES)
    }
    keep["method"] = method or ""
    return tuple(sorted(keep.items()))


def pretrain_row(run: Any, experiment: str, eval_runs: list[Any], now_ms: float) -> Row:
    """A pretraining run's row; accuracies missing on the run come from its newest eval runs."""
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics

    def metric(key: str) -> float | None:
        return metrics[key] if key in metrics else _eval_metric(eval_runs, key)

    method = tags.get("method") or params.get("method")
    linear_top1 = metric("linear_top1")

    return Row(
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", ""),
        experiment=experiment,
        kind=PRETRAIN_KIND,
        method=method,
        unmix=_flag(tags.get("unmix", params.get(UNMIX_PARAM))),
        arch=params.get("model.arch"),
        epochs=_int(params.get("optim.epochs")),
        batch_size=_int(params.get("optim.batch_size")),
        linear_top1=linear_top1,
        linear_top5=metric("linear_top5"),
        knn_top1=metric("knn_top1"),
        images_per_s=metrics.get("images_per_s"),
        duration_s=_duration(run, now_ms),
        status=run.info.status,
        seed=_int(params.get("seed")),
        protocol=None if linear_top1 is None else (_linear_protocol(eval_runs) or "?"),
        setting_key=setting_key(params, method),
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
                protocol=_linear_protocol(runs),
            )
        )
    return rows


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (Simpson integration of the
    density, then bisection; accurate to ~1e-9 for the 95 % intervals here; needs no SciPy)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"t_quantile: need 0.5 <= p < 1 and df >= 1 (got p={p}, df={df})")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(t: float, n: int = 2000) -> float:  # 0.5 + the integral of the density over [0, t]
        h = t / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def paired_gain(diffs: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of seed-paired differences with its ``level`` Student-t interval and a verdict.

    ``within noise`` when the interval holds 0; one pair: the difference, no interval.
    """
    n = len(diffs)
    if n == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None, "verdict": "no seed pairs"}
    mean = statistics.fmean(diffs)
    if n == 1:
        return {"n": 1, "mean": mean, "lo": None, "hi": None, "verdict": "1 seed: no interval"}
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    verdict = "within noise" if lo <= 0 <= hi else ("Un-Mix better" if lo > 0 else "Un-Mix worse")
    return {"n": n, "mean": mean, "lo": lo, "hi": hi, "verdict": verdict}


def _label(row: Row) -> str:
    return f"{row.method} {row.arch} {row.epochs}ep b{row.batch_size}"


def group_rows(rows: list[Row]) -> list[Group]:
    """Groups of pretraining rows equal in setting and Un-Mix flag; the newest run per seed counts.

    Sets each row's ``setting`` label (settings with equal labels but other params get ``#2``, ``#3``).
    """
    labels: dict[tuple, str] = {}
    members: dict[tuple, dict[Any, Row]] = {}
    for row in rows:
        if row.kind != PRETRAIN_KIND:
            continue
        if row.setting_key not in labels:
            base = _label(row)
            taken = sum(1 for v in labels.values() if v.split("#")[0] == base)
            labels[row.setting_key] = base if taken == 0 else f"{base}#{taken + 1}"
        row.setting = labels[row.setting_key]
        members.setdefault((row.setting_key, row.unmix), {}).setdefault(row.seed, row)  # rows: newest first
    groups = []
    for (key, unmix), by_seed in members.items():
        runs = sorted(by_seed.values(), key=lambda r: (r.seed is None, r.seed or 0))
        first = runs[0]
        g = Group(
            labels[key], first.method, unmix, first.arch, first.epochs, first.batch_size, len(runs),
            [r.seed for r in runs], [r.run_id for r in runs],
        )  # fmt: skip
        for m in GAIN_METRICS:
            values = [getattr(r, m) for r in runs if getattr(r, m) is not None]
            setattr(g, f"{m}_n", len(values))
            if values:
                setattr(g, f"{m}_mean", statistics.fmean(values))
                setattr(g, f"{m}_std", statistics.stdev(values) if len(values) > 1 else None)
        groups.append(g)
    groups.sort(key=lambda g: (g.setting, g.unmix == "on"))
    return groups


def pair_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """Pair the Un-Mix off/on groups of each setting by seed; returns one dict per setting pair.

    Each holds the seeds paired, the run ids, and per metric the mean of the on - off differences with
    its 95 % interval and verdict (:func:`paired_gain`). Sets ``paired_with`` and the per-seed gains on
    the rows. With several runs of one seed, the newest counts.
    """
    by_seed: dict[tuple, dict[str, dict[Any, Row]]] = {}
    for row in rows:
        if row.kind == PRETRAIN_KIND and row.unmix in ("on", "off"):
            by_seed.setdefault(row.setting_key, {}).setdefault(row.unmix, {}).setdefault(row.seed, row)
    pairs = []
    for g in by_seed.values():
        if "on" not in g or "off" not in g:
            continue
        seeds = sorted((s for s in g["on"] if s in g["off"]), key=lambda s: (s is None, s or 0))
        if not seeds:
            continue
        for s in seeds:
            on, off = g["on"][s], g["off"][s]
            on.paired_with, off.paired_with = off.run_id, on.run_id
            on.gain_linear_top1 = _diff(on.linear_top1, off.linear_top1)
            on.gain_knn_top1 = _diff(on.knn_top1, off.knn_top1)
        first = g["on"][seeds[0]]
        pair: dict[str, Any] = {
            "setting": first.setting or _label(first),
            **{f: getattr(first, f) for f in PAIR_FIELDS},
            "seeds": seeds,
            "off_run_ids": [g["off"][s].run_id for s in seeds],
            "on_run_ids": [g["on"][s].run_id for s in seeds],
        }
        for m in GAIN_METRICS:
            diffs = [getattr(g["on"][s], f"gain_{m}") for s in seeds]
            gain = paired_gain([d for d in diffs if d is not None])
            pair.update({f"gain_{m}" if k == "mean" else f"gain_{m}_{k}": v for k, v in gain.items()})
        pairs.append(pair)
    return pairs


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


@dataclass
class Comparison:
    rows: list[Row]
    pairs: list[dict[str, Any]]
    eval_runs: dict[str, list[Any]]  # pretraining run id -> its eval runs, newest first
    groups: list[Group] = field(default_factory=list)


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
    groups = group_rows(rows)  # labels the rows' settings (newest first: the newest run of a seed counts)
    pairs = pair_rows(rows)
    # one setting together, Un-Mix off before on, by seed; then the floor rows
    rows.sort(key=lambda r: (r.setting or "", r.unmix == "on", r.seed is None, r.seed or 0))
    rows += floor_rows(random_runs, names, now_ms)
    pixel_runs = [r for r in everything if run_kind(r) == PIXELS_KIND]
    rows += floor_rows(pixel_runs, names, now_ms, kind=PIXELS_KIND)
    return Comparison(rows=rows, pairs=pairs, eval_runs=evals, groups=groups)


_COLUMNS = [  # (header, Row attribute, format)
    ("run", "run_id", "id"),
    ("name", "name", "s"),
    ("method", "method", "s"),
    ("unmix", "unmix", "s"),
    ("arch", "arch", "s"),
    ("epochs", "epochs", "d"),
    ("batch", "batch_size", "d"),
    ("seed", "seed", "d"),
    ("lin top1", "linear_top1", ".2f"),
    ("protocol", "protocol", "s"),
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


def _row_dict(row: Row) -> dict[str, Any]:
    d = asdict(row)
    d.pop("setting_key")
    return d


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f}"


def _gain(pair: dict[str, Any], m: str) -> str:
    mean, lo, hi = pair[f"gain_{m}"], pair[f"gain_{m}_lo"], pair[f"gain_{m}_hi"]
    if mean is None:
        return "-"
    if lo is None:
        return f"{mean:+.2f} ({pair[f'gain_{m}_verdict']})"
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] {pair[f'gain_{m}_verdict']}"


def _tables(comp: Comparison) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, body) of the runs, the seed groups and the seed-paired Un-Mix gains."""
    header = [h for h, _, _ in _COLUMNS]
    body = [[_cell(getattr(r, attr), f) for _, attr, f in _COLUMNS] for r in comp.rows]
    out = [("runs", header, body)]
    if comp.groups:
        out.append(
            (
                "seed groups (mean ± std over seeds)",
                ["setting", "unmix", "n", "seeds", "lin top1", "knn top1"],
                [
                    [
                        g.setting,
                        g.unmix or "-",
                        str(g.n),
                        ",".join("-" if s is None else str(s) for s in g.seeds),
                        _mean_std(g.linear_top1_mean, g.linear_top1_std),
                        _mean_std(g.knn_top1_mean, g.knn_top1_std),
                    ]
                    for g in comp.groups
                ],
            )
        )
    if comp.pairs:
        out.append(
            (
                "Un-Mix gain: mean of seed-paired differences (on - off) [95 % t interval]",
                ["setting", "seed pairs", "gain lin top1", "gain knn top1"],
                [
                    [p["setting"], str(len(p["seeds"])), _gain(p, "linear_top1"), _gain(p, "knn_top1")]
                    for p in comp.pairs
                ],
            )
        )
    return out


def _aligned(header: list[str], body: list[list[str]]) -> list[str]:
    widths = [max(len(x) for x in col) for col in zip(header, *body, strict=False)]
    return [
        "  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in [header, *body]
    ]


def render(comp: Comparison, fmt: str = "table") -> str:
    """The comparison as aligned text tables, Markdown, CSV (the runs) or JSON (runs, groups, pairs)."""
    if fmt == "json":
        data = {
            "rows": [_row_dict(r) for r in comp.rows],
            "groups": [asdict(g) for g in comp.groups],
            "pairs": comp.pairs,
        }
        return json.dumps(data, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        names = [f.name for f in fields(Row) if f.name != "setting_key"]
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for r in comp.rows:
            writer.writerow(_row_dict(r))
        return buf.getvalue()
    if fmt not in ("table", "markdown"):
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    lines: list[str] = []
    for i, (title, header, body) in enumerate(_tables(comp)):
        if fmt == "markdown":
            if i:
                lines += ["", f"**{title}**", ""]
            lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in body]
        else:
            if i:
                lines += ["", title]
            lines += _aligned(header, body)
    if fmt == "table" and not comp.rows:
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
    """PNG of the rows' runs: pretraining loss per step, linear-eval val top-1 per epoch, the kNN
    monitor's ``knn_top1`` per pretraining step (``eval.knn_every_epochs``), and the spread over seeds:
    each group's runs (one dot per seed) with the group's mean ± std, kNN and linear top-1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    fig, (ax_loss, ax_eval, ax_knn, ax_seeds) = plt.subplots(1, 4, figsize=(24, 4.5))
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
    _plot_spread(ax_seeds, comp)
    ax_loss.set(title="pretraining loss", xlabel="step", ylabel="loss")
    ax_eval.set(title="linear evaluation", xlabel="epoch", ylabel="val top-1 (%)")
    ax_knn.set(title="kNN monitor (pretraining)", xlabel="step", ylabel="kNN top-1 (%)")
    for ax in (ax_loss, ax_eval, ax_knn, ax_seeds):
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


def _plot_spread(ax: Any, comp: Comparison) -> None:
    """One column per seed group: a dot per run, a bar for mean ± std; kNN left, linear right."""
    by_id = {r.run_id: r for r in comp.rows}
    for x, g in enumerate(comp.groups):
        for m, dx, color in (("knn_top1", -0.12, "tab:blue"), ("linear_top1", 0.12, "tab:orange")):
            values = [getattr(by_id[i], m) for i in g.run_ids if getattr(by_id[i], m) is not None]
            if not values:
                continue
            label = ("kNN top-1" if m == "knn_top1" else "linear top-1") if x == 0 else None
            ax.scatter([x + dx] * len(values), values, color=color, s=14, label=label)
            mean, std = getattr(g, f"{m}_mean"), getattr(g, f"{m}_std") or 0.0
            ax.errorbar([x + dx + 0.05], [mean], yerr=[std], color=color, capsize=4, marker="_")
    ax.set_xticks(range(len(comp.groups)))
    ax.set_xticklabels([f"{g.setting}\nunmix {g.unmix} (n={g.n})" for g in comp.groups], fontsize=6)
    ax.set(title="spread over seeds (mean ± std)", ylabel="top-1 (%)")
