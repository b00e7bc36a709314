"""``unmix bench shards``: shard write throughput (images/s) for JPEG copy and for re-encode.

Builds an ImageNet-like ImageFolder tree (:func:`unmix.pipeline.shards.sample.write_photo_tree`: 500x375
JPEGs of ~100 KB) and times :func:`unmix.pipeline.shards.writer.write_shards` on it, once per worker
count and mode:

- ``copy``: no re-encode, every JPEG copied byte for byte (the ImageNet train-set case);
- ``reencode``: ``--max-side`` smaller than the images, so every image is decoded, resized, encoded.

The tree was just written, so it is read from the page cache: the figures are the tool's own speed,
not the disk's. The time to build the tree is not counted. Besides wall-clock images/s the table gives
CPU milliseconds per image (this process, its threads and its worker processes): on a shared machine
that figure does not depend on what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and its finished children (the worker pool)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_bench(
    work: Path, images: int, workers: list[int], max_side: int, samples_per_shard: int = 1000
) -> dict[str, Any]:
    """Time the writes under ``work``; returns a JSON-able result dict."""
    from unmix.pipeline.shards.sample import write_photo_tree
    from unmix.pipeline.shards.writer import write_shards

    t0 = time.perf_counter()
    tree = write_photo_tree(work / "tree", images, n_classes=10, seed=0)
    build_s = time.perf_counter() - t0
    src_bytes = sum(p.stat().st_size for p in tree.rglob("*.JPEG"))
    rows = []
    for mode, ms in (("copy", None), ("reencode", max_side)):
        for w in workers:
            out = work / f"out-{mode}-{w}"
            t, c0 = time.perf_counter(), _cpu_seconds()
            m = write_shards(
                tree,
                out,
                split="train",
                samples_per_shard=samples_per_shard,
                max_side=ms,
                workers=w,
                progress=False,
            )
            dt, cpu = time.perf_counter() - t, _cpu_seconds() - c0
            rows.append(
                {
                    "mode": mode,
                    "workers": w,
                    "images": m.total,
                    "seconds": round(dt, 3),
                    "images_per_s": round(m.total / dt, 1),
                    "out_MB_per_s": round(m.bytes / dt / 1e6, 1),
                    "cpu_ms_per_image": round(cpu / m.total * 1e3, 3),
                    "shards": len(m.shards),
                    "encoded": m.encoded,
                }
            )
            shutil.rmtree(out)
    return {
        "command": "unmix bench shards",
        "images": images,
        "image_size": [500, 375],
        "mean_source_kB": round(src_bytes / images / 1e3, 1),
        "max_side": max_side,
        "tree_build_s": round(build_s, 2),
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "python": platform.python_version(),
        "results": rows,
    }


def format_table(res: dict[str, Any]) -> str:
    """The results as a plain-text table."""
    lines = [
        f"shard write: {res['images']} images 500x375 JPEG, mean {res['mean_source_kB']} kB, "
        f"{res['cpu_count']} CPUs (page cache warm)",
        f"{'mode':<10}{'workers':>8}{'seconds':>10}{'images/s':>11}{'MB/s out':>10}{'CPU ms/img':>12}",
    ]
    for r in res["results"]:
        mode = r["mode"] if r["mode"] == "copy" else f"max{res['max_side']}"
        lines.append(
            f"{mode:<10}{r['workers']:>8}{r['seconds']:>10.2f}{r['images_per_s']:>11.0f}"
            f"{r['out_MB_per_s']:>10.1f}{r['cpu_ms_per_image']:>12.3f}"
        )
    lines.append(
        f"load average at the end: {os.getloadavg()[0]:.1f} on {res['cpu_count']} CPUs; CPU ms/img does not "
        "depend on other load: 1000 * cores / (CPU ms/img) bounds images/s on that many free cores"
    )
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Handler of ``unmix bench shards``."""
    workers = args.workers or sorted({1, os.cpu_count() or 1})
    if args.dir:
        work = Path(args.dir)
        work.mkdir(parents=True, exist_ok=True)
        res = run_bench(work, args.images, workers, args.max_side)
    else:
        with tempfile.TemporaryDirectory(prefix="unmix-bench-shards-") as tmp:
            res = run_bench(Path(tmp), args.images, workers, args.max_side)
    res["command"] = (
        f"unmix bench shards --images {args.images} --workers {' '.join(map(str, workers))} "
        f"--max-side {args.max_side}"
    )
    print(format_table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0
