"""``unmix bench pipeline``: the DALI loader against a torchvision + webdataset DataLoader.

Both sides do the same work per image: read from the same shards, decode, two views of the same recipe
at the same crop, and (with Un-Mix) the mixture of view 1 with its batch-reversed partner. The baseline
is what the papers' code does: PIL transforms in ``num_workers=threads`` DataLoader workers (MoCo's PIL
Gaussian blur, torchvision ColorJitter/Grayscale/Solarize), batched, and Un-Mix on the batch in the
main process. Throughput is images per second (each image = two views + the mixture), timed after
warm-up steps, the two loaders measured alternately in the same run, ``--repeat`` times; the report
gives the medians and the ratios.

``--unmix-cost`` instead measures only what the mixture adds to the DALI graph, in paired measurements
of two live loaders (one measurement's noise on a shared machine is larger than that cost);
``--stages`` cuts the DALI graph after each stage to show where its time goes.

Without SHARDS (or with ``--make-data N``) an ImageNet-like workload is written first: N JPEGs of about
500x375 cut from real photographs shipped by scikit-learn and matplotlib
(:mod:`unmix.pipeline.shards.sample`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------ workload


def make_workload(out: Path, n_images: int, seed: int = 0) -> Path:
    """Write ``n_images`` ImageNet-like JPEGs (about 500x375) as shards under ``out/train``."""
    from unmix.pipeline.shards import read_manifest, write_shards
    from unmix.pipeline.shards.sample import write_photo_tree

    shards = out / "train"
    if (shards / "manifest.json").is_file() and read_manifest(shards).total == n_images:
        return shards
    with tempfile.TemporaryDirectory(prefix="unmix-bench-") as tmp:
        tree = write_photo_tree(Path(tmp) / "tree", n_images, n_classes=10, seed=seed)
        write_shards(
            tree,
            shards,
            samples_per_shard=max(64, n_images // 8),
            seed=seed,
            progress=False,
            overwrite=True,
            source_name=f"bench photos ({n_images} images, seed {seed})",
        )
    return shards


# ------------------------------------------------------------------------------------------ baseline


class _PilGaussianBlur:
    """MoCo v2's blur: PIL GaussianBlur with radius = sigma ~ U(lo, hi)."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, img):
        import random

        from PIL import ImageFilter

        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def torchvision_view(spec, crop: int):
    """The torchvision/PIL transform of one view of a :class:`unmix.pipeline.augment.ViewSpec`."""
    from torchvision import transforms as T

    from unmix.pipeline.augment import IMAGENET_MEAN, IMAGENET_STD

    ops: list[Any] = [T.RandomResizedCrop(crop, scale=spec.scale, ratio=spec.ratio)]
    if spec.p_jitter > 0:
        ops.append(T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.p_jitter))
    if spec.p_gray > 0:
        ops.append(T.RandomGrayscale(p=spec.p_gray))
    if spec.p_blur > 0:
        ops.append(T.RandomApply([_PilGaussianBlur(spec.blur_sigma)], p=spec.p_blur))
    if spec.p_solarize > 0:
        ops.append(T.RandomSolarize(128, p=spec.p_solarize))
    if spec.p_flip > 0:
        ops.append(T.RandomHorizontalFlip(spec.p_flip))
    ops += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(ops)


class _TwoViews:
    def __init__(self, recipe, crop: int):
        self.t1 = torchvision_view(recipe.view1, crop)
        self.t2 = torchvision_view(recipe.view2, crop)

    def __call__(self, img):
        return self.t1(img), self.t2(img)


def torch_unmix(x, p_mixup: float = 0.5, alpha: float = 1.0):
    """The authors' Un-Mix on a batch in torch (the pipeline's rule, :mod:`unmix.pipeline.torch_mixing`):
    returns (mixed, lam [B])."""
    import numpy as np

    from unmix.pipeline.torch_mixing import draw_mix, mix

    rng = np.random.default_rng(np.random.randint(2**31))  # the global NumPy stream, as the baseline's
    return mix(x, draw_mix(rng, tuple(x.shape[-2:]), p_mixup, alpha))


def torchvision_loader(shards, batch_size: int, recipe, crop: int, workers: int):
    """An endless torchvision + webdataset DataLoader yielding (view1, view2) batches."""
    import torch
    import webdataset as wds

    from unmix.pipeline.shards import read_manifest

    tars = read_manifest(shards).tar_paths
    ds = (
        wds.WebDataset(tars, resampled=True, shardshuffle=False, nodesplitter=None)
        .shuffle(1000)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(_TwoViews(recipe, crop), lambda c: c)
        .map(lambda s: s[0])
    )
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)


# ------------------------------------------------------------------------------------------ measuring


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live children (DataLoader workers).

    This process (all its threads, DALI's included) is read with ``time.process_time`` at nanosecond
    resolution; /proc's clock ticks (10 ms) can read zero over a short run whose batches were prefetched.
    """
    import psutil

    total = time.process_time()
    for p in psutil.Process().children(recursive=True):
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _time_steps(batches, warmup: int, steps: int, consume) -> tuple[float, float]:
    """(images/s, CPU ms per image) over ``steps`` batches after ``warmup`` untimed ones.

    The CPU time is that of this process and its worker processes: on a machine shared with other
    jobs it still measures the work done per image, when wall-clock throughput does not.
    """
    it = iter(batches)
    for _ in range(warmup):
        consume(next(it))
    c0, t0 = _cpu_seconds(), time.perf_counter()
    n = 0
    for _ in range(steps):
        n += consume(next(it))
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    return n / wall, 1000 * cpu / n


def _forever(loader):
    while True:
        yield from loader


def _dali_loader(shards, args, unmix: bool, channels_last: bool = False):
    """The pretraining loader every DALI measurement uses."""
    from unmix.pipeline.loaders import build_pretrain_loader

    return build_pretrain_loader(
        shards,
        args.batch_size,
        recipe=args.recipe,
        crop=args.crop,
        unmix={"enabled": unmix},
        device=args.device,
        num_threads=args.threads,
        seed=0,
        channels_last=channels_last,
    )


def _consumer(device: str):
    """Takes a DALI batch (waiting for the GPU's work on it); returns its size."""
    import torch

    def consume(b):
        if device == "gpu":
            torch.cuda.synchronize()
        return b["view1"].shape[0]

    return consume


def measure_dali(shards, args, unmix: bool) -> tuple[float, float]:
    """Images/s of :func:`unmix.pipeline.build_pretrain_loader` (views + mixture reach the consumer)."""
    return _time_steps(
        _forever(_dali_loader(shards, args, unmix)), args.warmup, args.steps, _consumer(args.device)
    )


def measure_torchvision(shards, args, unmix: bool) -> tuple[float, float]:
    """Images/s of the torchvision + webdataset DataLoader with Un-Mix in the main process."""
    import torch

    from unmix.pipeline.augment import get_recipe

    torch.set_num_threads(args.threads)
    loader = torchvision_loader(shards, args.batch_size, get_recipe(args.recipe), args.crop, args.threads)
    dev = torch.device("cuda") if args.device == "gpu" else None

    def consume(b):
        v1, v2 = b
        if dev is not None:
            v1, v2 = v1.to(dev, non_blocking=True), v2.to(dev, non_blocking=True)
        if unmix:
            torch_unmix(v1)
        if dev is not None:
            torch.cuda.synchronize()
        return v1.shape[0]

    try:
        return _time_steps(loader, args.warmup, args.steps, consume)
    finally:
        del loader


STAGES = ("read", "decode", "crop", "colour", "blur", "solarize", "normalize")


def _stage_recipe(recipe, stage: str):
    """``recipe`` with the augmentations after ``stage`` switched off (crop: random resized crop only)."""
    import dataclasses

    from unmix.pipeline.augment import Recipe

    off = {
        "crop": {"p_jitter": 0.0, "p_gray": 0.0, "p_blur": 0.0, "p_solarize": 0.0},
        "colour": {"p_blur": 0.0, "p_solarize": 0.0},
        "blur": {"p_solarize": 0.0},
    }.get(stage, {})
    return Recipe(
        recipe.name, dataclasses.replace(recipe.view1, **off), dataclasses.replace(recipe.view2, **off)
    )


def measure_stage(shards, args, stage: str) -> tuple[float, float]:
    """(images/s, CPU ms per image) of the DALI graph cut after ``stage`` (one of :data:`STAGES`)."""
    from nvidia.dali import pipeline_def

    from unmix.pipeline.augment import get_recipe, random_view, two_views
    from unmix.pipeline.loaders import _decode, _device_id, _read, shard_files

    files = shard_files(shards)
    recipe = _stage_recipe(get_recipe(args.recipe), stage)

    @pipeline_def(enable_conditionals=True)
    def graph():
        jpegs, _ = _read(files, 0, 1, True, 1024)
        if stage == "read":
            return jpegs
        images = _decode(jpegs, args.device)
        if stage == "decode":
            return images
        if stage == "normalize":
            return two_views(images, recipe, args.crop)
        return random_view(images, recipe.view1, args.crop), random_view(images, recipe.view2, args.crop)

    pipe = graph(
        batch_size=args.batch_size,
        num_threads=args.threads,
        device_id=_device_id(args.device),
        seed=0,
        exec_dynamic=True,
        prefetch_queue_depth=2,
    )
    pipe.build()

    def batches():
        while True:
            pipe.run()  # outputs stay on the host: the cost of the graph alone
            yield args.batch_size

    return _time_steps(batches(), args.warmup, args.steps, lambda n: n)


def run_stages(shards: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Measure every stage (medians over ``--repeat``) and print CPU ms per image and each stage's share."""
    figures: dict[str, dict[str, float]] = {}
    print(
        f"\nDALI {args.recipe} graph, {args.device}, batch {args.batch_size}, "
        f"{args.threads} threads, crop {args.crop}"
    )
    print(f"  {'cut after':10s} {'img/s':>8s} {'CPU ms/img':>11s} {'stage adds':>11s}")
    previous = 0.0
    for stage in STAGES:
        runs = [measure_stage(shards, args, stage) for _ in range(args.repeat)]
        ips = statistics.median(r[0] for r in runs)
        ms = statistics.median(r[1] for r in runs)
        figures[stage] = {"images_per_s": ips, "cpu_ms_per_image": ms, "stage_cpu_ms": ms - previous}
        print(f"  {stage:10s} {ips:8.1f} {ms:11.2f} {ms - previous:+11.2f}", flush=True)
        previous = ms
    return figures


def _paired_cpu_ms(its: dict[Any, Any], consumers: dict[Any, Any], args) -> dict[Any, list[float]]:
    """CPU ms per image of live loaders measured back to back: ``--repeat`` rounds of ``--steps``
    batches each (after one untimed batch), the order alternating between rounds."""
    names = list(its)
    for name in names:  # every pipeline warm before the first round
        for _ in range(args.warmup):
            consumers[name](next(its[name]))
    cpu_ms: dict[Any, list[float]] = {name: [] for name in names}
    for rep in range(args.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            cpu_ms[name].append(_time_steps(its[name], 1, args.steps, consumers[name])[1])
    return cpu_ms


def _paired_summary(cpu_ms: dict[Any, list[float]], base: Any, other: Any) -> dict[str, Any]:
    diffs = [a - b for a, b in zip(cpu_ms[other], cpu_ms[base], strict=True)]
    off = statistics.median(cpu_ms[base])
    out = {
        "off_cpu_ms": off,
        "on_cpu_ms": statistics.median(cpu_ms[other]),
        "diff_median_ms": statistics.median(diffs),
        "diff_mean_ms": statistics.mean(diffs),
        "diff_sem_ms": statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan"),
        "pairs": len(diffs),
    }
    out["fraction_median"] = out["diff_median_ms"] / off
    out["fraction_mean"] = out["diff_mean_ms"] / off
    return out


def _print_paired(out: dict[str, Any], base: str, other: str, diff: str) -> None:
    print(f"  {base:15s} {out['off_cpu_ms']:7.2f} CPU ms/img (median)")
    print(f"  {other:15s} {out['on_cpu_ms']:7.2f} CPU ms/img (median)")
    print(
        f"  {diff:15s} {out['diff_median_ms']:+7.2f} ms median, {out['diff_mean_ms']:+.2f} ± "
        f"{out['diff_sem_ms']:.2f} ms mean ± s.e.m."
    )
    print(f"  as a fraction   {out['fraction_median']:+7.1%} median, {out['fraction_mean']:+.1%} mean")


def unmix_cost(shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """Un-Mix's CPU cost per image over mixing off, from paired measurements.

    One measurement of a loader's CPU time per image varies by more than Un-Mix costs on a shared
    machine, so both loaders (built as :func:`measure_dali` builds them) stay alive in one process and
    are measured back to back, ``--repeat`` pairs of ``--steps`` batches (each after one untimed batch),
    the order alternating; the report is the median and mean (with its standard error) of the paired
    differences.
    """
    its = {on: _forever(_dali_loader(shards, args, on)) for on in (False, True)}
    consume = _consumer(args.device)
    out = _paired_summary(_paired_cpu_ms(its, {False: consume, True: consume}, args), False, True)
    print(
        f"\nUn-Mix cost, DALI {args.recipe} graph, {args.device}, "
        f"{out['pairs']} pairs of {args.steps} batches"
    )
    _print_paired(out, "mixing off", "Un-Mix on", "on - off")
    return out


def layout_cost(shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """CPU cost per image of channels_last batches, Un-Mix on: the loader's ``channels_last=True`` (HWC
    from DALI, no copy) against NCHW output converted by the consumer (``.contiguous(channels_last)`` of
    the three images, what the training loop did for a channels_last model). Paired as :func:`unmix_cost`.
    """
    import torch

    its = {cl: _forever(_dali_loader(shards, args, True, channels_last=cl)) for cl in (False, True)}
    consume = _consumer(args.device)

    def convert_then_consume(b):
        for k in ("view1", "view2", "mixed"):
            b[k] = b[k].contiguous(memory_format=torch.channels_last)
        return consume(b)

    cpu_ms = _paired_cpu_ms(its, {False: convert_then_consume, True: consume}, args)
    out = _paired_summary(cpu_ms, False, True)
    print(
        f"\nchannels_last batches, DALI {args.recipe} graph with Un-Mix, {args.device}, "
        f"{out['pairs']} pairs of {args.steps} batches"
    )
    _print_paired(out, "NCHW + convert", "DALI HWC", "HWC - NCHW")
    return out


def _ratio(num: float, den: float) -> float | None:
    """``num / den``, or None where the baseline ``den`` measured zero (no ratio to report)."""
    return num / den if den > 0 else None


def _load() -> float:
    import os

    return os.getloadavg()[0]


def run_bench(args: argparse.Namespace) -> int:
    """Entry point of ``unmix bench pipeline``."""
    with tempfile.TemporaryDirectory(prefix="unmix-bench-") as tmp:
        shards = args.shards
        if shards is None or args.make_data:
            n = args.make_data or 512
            root = Path(args.data_dir or tmp)
            print(f"writing a {n}-image photo workload (~500x375 JPEGs) under {root} ...", file=sys.stderr)
            shards = str(make_workload(root, n))
        if args.stages:
            results = {"stages": run_stages(shards, args)}
        elif args.unmix_cost:
            results = {"unmix_cost": unmix_cost(shards, args)}
        elif args.layout_cost:
            results = {"layout_cost": layout_cost(shards, args)}
        else:
            results = compare_loaders(shards, args)
    if args.json:
        keys = ("device", "recipe", "batch_size", "crop", "threads", "steps", "warmup", "repeat")
        settings = {k: getattr(args, k) for k in keys}
        Path(args.json).write_text(json.dumps({"settings": settings, **results}, indent=1))
    return 0


def compare_loaders(shards: str, args: argparse.Namespace) -> dict[str, Any]:
    """DALI vs torchvision, Un-Mix on and off, alternating ``--repeat`` times; prints and returns figures."""
    configs = [("dali", False), ("dali", True), ("torchvision", False), ("torchvision", True)]
    if args.only:
        configs = [c for c in configs if c[0] == args.only]
    names = [f"{s}_{'unmix' if u else 'plain'}" for s, u in configs]
    figures: dict[str, list[float]] = {k: [] for k in names}
    cpu_ms: dict[str, list[float]] = {k: [] for k in names}
    for rep in range(args.repeat):
        for (side, unmix), name in zip(configs, names, strict=True):
            fn = measure_dali if side == "dali" else measure_torchvision
            ips, ms = fn(shards, args, unmix)
            figures[name].append(ips)
            cpu_ms[name].append(ms)
            print(
                f"[{rep + 1}/{args.repeat}] {side:11s} unmix={'on ' if unmix else 'off'} "
                f"{ips:8.1f} img/s  {ms:6.2f} CPU ms/img  (load {_load():.1f})",
                flush=True,
            )
    med = {k: statistics.median(v) for k, v in figures.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_ms.items()}
    ratios: dict[str, float | None] = {}
    if "dali_unmix" in med and "torchvision_unmix" in med:
        for mode in ("unmix", "plain"):
            ratios[f"speedup_{mode}"] = _ratio(med[f"dali_{mode}"], med[f"torchvision_{mode}"])
            ratios[f"cpu_efficiency_{mode}"] = _ratio(med_cpu[f"torchvision_{mode}"], med_cpu[f"dali_{mode}"])
    for side in ("dali", "torchvision"):
        if f"{side}_unmix" in med:
            r = _ratio(med[f"{side}_unmix"], med[f"{side}_plain"])
            ratios[f"{side}_unmix_cost"] = None if r is None else 1 - r
            r = _ratio(med_cpu[f"{side}_unmix"], med_cpu[f"{side}_plain"])
            ratios[f"{side}_unmix_cpu_cost"] = None if r is None else r - 1
    print("\nmedians (each image: two views, + the mixture when Un-Mix is on)")
    for k in med:
        print(f"  {k:20s} {med[k]:8.1f} img/s  {med_cpu[k]:6.2f} CPU ms/img")
    print("ratios (speedup: wall clock; cpu_efficiency: CPU time per image, robust on a busy machine)")
    for k, v in ratios.items():
        if v is None:
            print(f"  {k:28s}      n/a  (its baseline measured zero: run more --steps)")
        else:
            print(f"  {k:28s} {v:8.3f}" + ("  (fraction)" if "cost" in k else "x"))
    return {
        "shards": str(args.shards or "photos"),
        "images_per_s": figures,
        "cpu_ms_per_image": cpu_ms,
        "median": med,
        "median_cpu_ms": med_cpu,
        "ratios": ratios,
    }
