"""``unmix demo``: the main job on the built-in sample data, end to end.

Steps (each a subprocess of this same ``unmix`` so a failure names its stage and logs stay apart):

1. write the ``digits`` sample shards (``unmix shards sample digits``) unless already there;
2. pretrain MoCo v2 without and with Un-Mix (``configs/demo.yaml``: a small backbone, a few epochs),
   each with ``--seeds`` seeds (default 2);
3. linear evaluation (the default probe, ``logreg`` on cached features; ``--linear-epochs N``: MoCo's
   SGD head for N epochs instead) and kNN of every backbone, of a random-init backbone and of the raw
   pixels (the floors, linear and kNN);
4. the comparison table from MLflow (seed groups, the seed-paired Un-Mix gain with its 95 % interval)
   and a plot (PNG); a summary that says what is and is not within noise.

Everything lands under ``--workdir`` (default ``./demo``), with an MLflow SQLite store there.
A re-run reuses the shards and resumes or skips finished pretraining runs (``unmix train`` resumes).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
EXPERIMENT = "unmix-demo"


def _unmix(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Run ``unmix ARGS`` as a subprocess, output teed into ``log``; raise naming the stage on failure."""
    cmd = [sys.executable, "-m", "unmix", *args]
    print(f"\n$ unmix {' '.join(args)}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:
            fh.write(line)
            sys.stdout.write("  " + line)
        status = proc.wait()
    if status != 0:
        raise SystemExit(f"unmix demo: `unmix {args[0]}` failed with exit status {status}; log: {log}")


SETTINGS = (("mocov2", "false"), ("mocov2_unmix", "true"))


def run_demo(
    workdir: Path,
    device: str = "cpu",
    overrides: list[str] | None = None,
    linear_epochs: int | None = None,
    seeds: int = 2,
) -> dict:
    """Run the whole demo in ``workdir``; returns the results and the comparison (``unmix compare`` JSON).

    Each setting (MoCo v2 without / with Un-Mix) is pretrained with ``seeds`` seeds (0, 1, ...): single
    runs differ by more than the Un-Mix effect, so the summary reports means and the seed-paired gain.
    ``linear_epochs``: None for the reference probe (``logreg``), else the epochs of an SGD head
    (``protocol=moco``), both on cached features.
    """
    if not DEMO_CONFIG.is_file():
        raise SystemExit(f"unmix demo: {DEMO_CONFIG} not found (the demo runs from a checkout of unmix)")
    if seeds < 1:
        raise SystemExit(f"unmix demo: --seeds {seeds}: need at least 1")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data, runs, logs = workdir / "data", workdir / "runs", workdir / "logs"
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    if device == "cpu":
        env.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.time()

    if not (data / "train" / "manifest.json").is_file() or not (data / "val" / "manifest.json").is_file():
        _unmix(["shards", "sample", "digits", str(data)], logs / "shards.log", env)

    common = [
        f"data.train={data / 'train'}",
        f"data.val={data / 'val'}",
        f"data.device={device}",
        f"mlflow.tracking_uri={tracking_uri}",
        f"mlflow.experiment={EXPERIMENT}",
        *(overrides or []),
    ]
    backbones = {}
    for seed in range(seeds):
        for setting, unmix in SETTINGS:
            name = f"{setting}_s{seed}"
            out = runs / name
            args = ["train", str(DEMO_CONFIG), f"output_dir={out}", f"unmix.enabled={unmix}", *common]
            _unmix([*args, f"seed={seed}"], logs / f"train_{name}.log", env)
            backbones[name] = out / "backbone.pt"

    linear = [f"device={device}", "features=cached"]
    if linear_epochs is not None:
        linear += ["protocol=moco", f"epochs={linear_epochs}"]
    results: dict[str, dict] = {}
    splits = ["--train", str(data / "train"), "--val", str(data / "val")]

    def evaluate(name: str, source: list[str], crop: list[str]) -> None:
        """Linear probe and kNN of one backbone (or floor): ``results[name] = {"linear":…, "knn":…}``."""
        out = runs / name
        out.mkdir(parents=True, exist_ok=True)
        for kind, extra in (("linear", linear), ("knn", [f"device={device}"])):
            js = out / f"{kind}.json"
            _unmix(
                [kind, *source, *splits, "--json", str(js), *extra, *crop], logs / f"{kind}_{name}.log", env
            )
            results.setdefault(name, {})[kind] = json.loads(js.read_text())

    for name, backbone in backbones.items():
        evaluate(name, ["--backbone", str(backbone)], [])
    from unmix.training.config import load_config

    cfg = load_config(DEMO_CONFIG, overrides)  # the random-init floor: the pretrained architecture
    crop = [f"data.crop={cfg.data.crop}"]
    width = ["--width", str(cfg.model.width)]
    evaluate("random_init", ["--random-init", cfg.model.arch, *width, "--experiment", EXPERIMENT], crop)
    evaluate("pixels", ["--pixels", "--experiment", EXPERIMENT], crop)

    plot = workdir / "compare.png"
    _unmix(
        ["compare", "--experiment", EXPERIMENT, "--tracking-uri", tracking_uri, "--plot", str(plot)],
        logs / "compare.log",
        env,
    )
    rows_json = workdir / "compare.json"
    with open(rows_json, "w") as fh:
        cmd = ["compare", "--experiment", EXPERIMENT, "--tracking-uri", tracking_uri, "--format", "json"]
        subprocess.run([sys.executable, "-m", "unmix", *cmd], stdout=fh, check=True, env=env)
    comparison = json.loads(rows_json.read_text())

    print(f"\nDemo finished in {time.time() - t0:.0f} s.")
    print(summary(results, comparison["pairs"], seeds))
    print(f"\nResults:   {workdir}\n  table:   {rows_json}\n  plot:    {plot}\n  logs:    {logs}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
    return {"results": results, "compare": comparison}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:6.2f}        "
    return f"{statistics.fmean(values):6.2f} ± {statistics.stdev(values):5.2f}"


def summary(results: dict[str, dict], pairs: list[dict], seeds: int) -> str:
    """The demo's closing lines: top-1 per setting over seeds, both floors, and what is within noise."""
    lines = [f"Top-1 on the digits val set (%), mean ± std over {seeds} seed(s); floors: one run each:"]
    lines.append(f"  {'':<16} {'linear':<15}  {'kNN':<15}")
    floors = {name: results[name] for name in ("random_init", "pixels")}
    for setting, _ in SETTINGS:
        runs = [r for name, r in results.items() if name.rsplit("_s", 1)[0] == setting]
        lin = [r["linear"]["top1"] for r in runs]
        knn = [r["knn"]["top1"] for r in runs]
        lines.append(f"  {setting:<16} {_mean_std(lin)}  {_mean_std(knn)}")
    for name, r in floors.items():
        label = "random init" if name == "random_init" else "raw pixels"
        lines.append(f"  {label:<16} {r['linear']['top1']:6.2f}           {r['knn']['top1']:6.2f}")
    for kind in ("linear", "kNN"):
        best = max(f[kind.lower()]["top1"] for f in floors.values())
        runs = [r[kind.lower()]["top1"] for name, r in results.items() if name not in floors]
        above = sum(v > best for v in runs)
        lines.append(
            f"  {kind}: {above} of {len(runs)} pretrained run(s) above the better floor ({best:.2f} %)"
        )
    lines.append("")
    for pair in pairs:
        n = len(pair["seeds"])
        for kind, key in (("linear", "linear_top1"), ("kNN", "knn_top1")):
            mean, lo, hi = pair[f"gain_{key}"], pair[f"gain_{key}_lo"], pair[f"gain_{key}_hi"]
            if mean is None:
                continue
            if lo is None:
                lines.append(
                    f"Un-Mix gain, {kind} top-1: {mean:+.2f} from 1 seed pair: no interval, not a result"
                )
                continue
            verdict = pair[f"gain_{key}_verdict"]
            lines.append(
                f"Un-Mix gain, {kind} top-1: {mean:+.2f} points, 95 % interval [{lo:+.2f}, {hi:+.2f}] over "
                f"{n} seed pairs: {verdict.upper() if verdict == 'within noise' else verdict}"
            )
        if 2 <= n <= 4:
            from unmix.eval.compare import t_quantile

            lines.append(
                f"  (with {n} seed pairs the 95 % interval is ±{t_quantile(0.975, n - 1):.1f} standard "
                "errors: "
                "only an effect far larger than the paper's 1-3 points can leave it; `--seeds N` narrows it)"
            )
    return "\n".join(lines)


def default_device() -> str:
    """``gpu`` when CUDA is available, else ``cpu`` (the default of ``--device``)."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"
