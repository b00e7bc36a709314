"""``unmix demo``: the main job on the built-in sample data, end to end.

Steps (each a subprocess of this same ``unmix`` so a failure names its stage and logs stay apart):

1. write the ``digits`` sample shards (``unmix shards sample digits``) unless already there;
2. pretrain MoCo v2 without and with Un-Mix (``configs/demo.yaml``: a small backbone, a few epochs);
3. linear evaluation of both backbones, of a random-init backbone and of the raw pixels (the floors),
   plus kNN;
4. the comparison table from MLflow and a plot (PNG).

Everything lands under ``--workdir`` (default ``./demo``), with an MLflow SQLite store there.
A re-run reuses the shards and resumes or skips finished pretraining runs (``unmix train`` resumes).
"""

from __future__ import annotations

import argparse
import json
import os
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


def run_demo(
    workdir: Path,
    device: str = "cpu",
    overrides: list[str] | None = None,
    linear_epochs: int = 30,
) -> dict:
    """Run the whole demo in ``workdir``; returns the comparison rows (as ``unmix compare --format json``)."""
    if not DEMO_CONFIG.is_file():
        raise SystemExit(f"unmix demo: {DEMO_CONFIG} not found (the demo runs from a checkout of unmix)")
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
    for name, unmix in (("mocov2", "false"), ("mocov2_unmix", "true")):
        out = runs / name
        _unmix(
            ["train", str(DEMO_CONFIG), f"output_dir={out}", f"unmix.enabled={unmix}", *common],
            logs / f"train_{name}.log",
            env,
        )
        backbones[name] = out / "backbone.pt"

    linear = [f"epochs={linear_epochs}", f"device={device}", "features=cached"]
    results = {}
    splits = ["--train", str(data / "train"), "--val", str(data / "val")]
    for name, backbone in backbones.items():
        js = runs / name / "linear.json"
        _unmix(
            ["linear", "--backbone", str(backbone), *splits, "--json", str(js), *linear],
            logs / f"linear_{name}.log",
            env,
        )
        _unmix(
            [
                "knn",
                "--backbone",
                str(backbone),
                *splits,
                "--json",
                str(runs / name / "knn.json"),
                f"device={device}",
            ],
            logs / f"knn_{name}.log",
            env,
        )
        results[name] = json.loads(js.read_text())
    from unmix.training.config import load_config

    cfg = load_config(DEMO_CONFIG, overrides)  # the random-init floor: the pretrained architecture
    js = runs / "random_init" / "linear.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    random_init = [
        "--random-init",
        cfg.model.arch,
        "--width",
        str(cfg.model.width),
        "--experiment",
        EXPERIMENT,
    ]
    _unmix(
        ["linear", *random_init, *splits, "--json", str(js), *linear, f"data.crop={cfg.data.crop}"],
        logs / "linear_random_init.log",
        env,
    )
    results["random_init"] = json.loads(js.read_text())
    js = runs / "pixels" / "linear.json"
    js.parent.mkdir(parents=True, exist_ok=True)
    _unmix(
        [
            "linear",
            "--pixels",
            "--experiment",
            EXPERIMENT,
            *splits,
            "--json",
            str(js),
            *linear,
            f"data.crop={cfg.data.crop}",
        ],
        logs / "linear_pixels.log",
        env,
    )
    results["pixels"] = json.loads(js.read_text())

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

    floor, pixels = results["random_init"]["top1"], results["pixels"]["top1"]
    print(f"\nDemo finished in {time.time() - t0:.0f} s. Linear top-1 on the digits val set:")
    for name, r in results.items():
        vs = "" if name in ("random_init", "pixels") else f"  ({r['top1'] - floor:+.2f} vs random init)"
        vs += "" if name == "pixels" else f"  ({r['top1'] - pixels:+.2f} vs raw pixels)"
        print(f"  {name:<14} {r['top1']:6.2f} %{vs}")
    print(f"\nResults:   {workdir}\n  table:   {rows_json}\n  plot:    {plot}\n  logs:    {logs}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
    return {"results": results, "compare": json.loads(rows_json.read_text())}


def _default_device() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _cmd_demo(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    run_demo(Path(args.workdir), device=device, overrides=args.overrides, linear_epochs=args.linear_epochs)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    p = sub.add_parser(
        "demo",
        help="the main job on built-in data: MoCo v2 +/- Un-Mix, eval, compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--workdir", default="demo", help="where data, runs, MLflow store and plot go (default: ./demo)"
    )
    p.add_argument(
        "--device", choices=("cpu", "gpu"), default=None, help="default: gpu when CUDA is available, else cpu"
    )
    p.add_argument(
        "--linear-epochs", type=int, default=30, help="epochs of the linear head on cached features"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the pretraining config")
    p.set_defaults(func=_cmd_demo)
