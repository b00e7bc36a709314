"""Built-in sample data sets made from real images that installed dependencies ship (no network).

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled bicubically to
  32x32 RGB JPEG; classes ``"0" .. "9"``; stratified 80/20 train/val split with a fixed seed.
- ``shifted-digits``: the same digits, each scaled to 50-80 % of a 16x16 black canvas and pasted at a
  random position (so where a digit sits and how large it is vary more than its shape); each val digit
  is placed ``SHIFTED_VAL_PLACEMENTS`` (5) times at independent places and sizes (1,795 val images), so
  that a kNN score's noise from the val draw (~3 points of a lift on 359 images) does not hide a few
  points of learning. A random-init ResNet-10's kNN is ~44 % here, against ~91 % on ``digits``, which
  leaves room to see pretraining lift it: the data of ``unmix bench learning``
  (:mod:`unmix.eval.bench_learning`).
- ``photos``: ImageNet-like ~500x375 JPEGs (~100 KB) cut from real photographs (scikit-learn's
  ``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``) by random crops, scales, flips and
  colour shifts. Class ``c`` uses photograph ``c % 3`` with a class-specific colour cast, so the classes
  are learnable. :func:`write_photo_tree` writes it as an ImageFolder tree (used by the benchmarks).

Everything is deterministic given the seed.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from unmix.pipeline.shards.manifest import Manifest
from unmix.pipeline.shards.sources import memory_source
from unmix.pipeline.shards.writer import write_shards

SAMPLES = ("digits", "shifted-digits", "photos")
SHIFTED_SIZE = 16  # the shifted-digits canvas (pixels)
SHIFTED_SCALE = (0.5, 0.8)  # a digit's side as a fraction of the canvas side
SHIFTED_VAL_PLACEMENTS = 5  # each val digit at this many independent places and sizes


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images [1797, 8, 8] float 0..16, targets [1797] int).

    Read straight from the CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``, what
    ``load_digits`` reads) so that the test fixture does not pay for importing scikit-learn (seconds).
    """
    path = _package_file("sklearn", "datasets", "data", "digits.csv.gz")
    if path is None:
        from sklearn.datasets import load_digits

        d = load_digits()
        return d.images, d.target.astype(np.int64)
    a = np.loadtxt(path, delimiter=",")
    return a[:, :-1].reshape(-1, 8, 8), a[:, -1].astype(np.int64)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): per class, ``round(n_c * val_fraction)`` random samples go to val."""
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val.extend(rng.choice(idx, size=int(round(len(idx) * val_fraction)), replace=False).tolist())
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[val] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def digits_images(val_fraction: float = 0.2, seed: int = 0) -> dict[str, list[tuple[str, bytes, int]]]:
    """The digits as 32x32 RGB JPEGs: ``{"train": [(name, jpeg, label)], "val": [...]}``."""
    images, target = load_digits_arrays()
    tr, va = stratified_split(target, val_fraction, seed)
    out: dict[str, list[tuple[str, bytes, int]]] = {}
    for split, ids in (("train", tr), ("val", va)):
        out[split] = []
        for i in ids:
            g = (images[i] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # 8x8, 0..16 -> 0..255
            img = Image.fromarray(g, mode="L").resize((32, 32), Image.Resampling.BICUBIC).convert("RGB")
            out[split].append((f"{target[i]}/digit_{i:04d}.jpg", _jpeg(img, 95), int(target[i])))
    return out


def shifted_digit(g8: np.ndarray, rng: np.random.Generator, size: int = SHIFTED_SIZE) -> Image.Image:
    """One 8x8 digit (0..16) scaled to a random 50-80 % of a ``size`` x ``size`` black canvas (bicubic) and
    pasted at a uniformly random position; RGB."""
    g = (g8 * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    side = int(round(size * rng.uniform(*SHIFTED_SCALE)))
    digit = Image.fromarray(g, mode="L").resize((side, side), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (size, size), 0)
    x, y = rng.integers(0, size - side + 1, size=2)
    canvas.paste(digit, (int(x), int(y)))
    return canvas.convert("RGB")


def shifted_digits_images(
    val_fraction: float = 0.2, seed: int = 0
) -> dict[str, list[tuple[str, bytes, int]]]:
    """The shifted digits (16x16 RGB JPEGs, the ``digits`` split): ``{"train": [...], "val": [...]}``;
    each train digit once, each val digit ``SHIFTED_VAL_PLACEMENTS`` times (``digit_IIII_R.jpg``)."""
    images, target = load_digits_arrays()
    tr, va = stratified_split(target, val_fraction, seed)
    rng = np.random.default_rng(seed)

    def item(i: int, name: str) -> tuple[str, bytes, int]:
        return f"{target[i]}/{name}.jpg", _jpeg(shifted_digit(images[i], rng), 95), int(target[i])

    train = [item(i, f"digit_{i:04d}") for i in tr]
    val = [item(i, f"digit_{i:04d}_{r}") for r in range(SHIFTED_VAL_PLACEMENTS) for i in va]
    return {"train": train, "val": val}


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    locs = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locs[0], *parts) if locs else None
    return path if path is not None and path.is_file() else None


def _base_photos() -> list[Image.Image]:
    """scikit-learn's china.jpg and flower.jpg, matplotlib's grace_hopper.jpg (as RGB images)."""
    files = [
        _package_file("sklearn", "datasets", "images", "china.jpg"),
        _package_file("sklearn", "datasets", "images", "flower.jpg"),
        _package_file("matplotlib", "mpl-data", "sample_data", "grace_hopper.jpg"),
    ]
    missing = [f for f in files if f is None]
    if missing:
        raise FileNotFoundError("sample photographs not found: scikit-learn and matplotlib must be installed")
    return [Image.open(f).convert("RGB") for f in files]


def _class_gain(c: int, n_base: int) -> np.ndarray:
    """A colour cast per class (identity for the first class of each photograph)."""
    variant = c // n_base
    if variant == 0:
        return np.ones(3, dtype=np.float32)
    g = np.random.default_rng(1000 + variant).uniform(0.6, 1.3, size=3).astype(np.float32)
    return g / g.mean()


def make_photo(
    base: Image.Image, rng: np.random.Generator, gain: np.ndarray, size: tuple[int, int] = (500, 375)
) -> Image.Image:
    """One random view of ``base``: crop (30-100 % of the area), resize to ``size``, flip, colour shift,
    and a little film grain (so that JPEGs come out photo-sized, ~100 KB at 500x375, quality 95)."""
    W, H = base.size
    w_out, h_out = size
    aspect = w_out / h_out * float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
    area = rng.uniform(0.3, 1.0) * W * H
    cw = int(min(W, round(np.sqrt(area * aspect))))
    ch = int(min(H, round(np.sqrt(area / aspect))))
    x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
    img = base.crop((x0, y0, x0 + cw, y0 + ch)).resize(size, Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
    img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.7, 1.3)))
    a = np.asarray(img, dtype=np.float32) * (gain * rng.uniform(0.95, 1.05, size=3)).astype(np.float32)
    a += rng.normal(0.0, 4.0, size=(a.shape[0], a.shape[1], 1)).astype(np.float32)
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def _photos(n_images: int, n_classes: int, seed: int, size: tuple[int, int], quality: int):
    """Yield ``(class index, image index, jpeg bytes)`` for the photo set (deterministic in ``seed``)."""
    if n_images < n_classes:
        raise ValueError(f"n_images ({n_images}) must be >= n_classes ({n_classes})")
    bases = _base_photos()
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        c = i % n_classes
        yield c, i, _jpeg(make_photo(bases[c % len(bases)], rng, _class_gain(c, len(bases)), size), quality)


def write_photo_tree(
    out_dir: str | Path,
    n_images: int,
    n_classes: int = 10,
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
    quality: int = 95,
) -> Path:
    """Write ``n_images`` ImageNet-like JPEGs as an ImageFolder tree ``out_dir/class<c>/img_<i>.JPEG``.

    Images are spread evenly over ``n_classes`` classes (``class000``, ``class001``, ...), named with the
    ImageNet-style ``.JPEG`` extension, ``size`` = (width, height) (default 500x375, about 100 KB each at
    ``quality`` 95). Deterministic in ``seed``. Returns ``out_dir``.
    """
    out = Path(out_dir)
    for c in range(n_classes):
        (out / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for c, i, data in _photos(n_images, n_classes, seed, size, quality):
        (out / f"class{c:03d}" / f"img_{i:07d}.JPEG").write_bytes(data)
    return out


def photo_images(
    n_images: int, n_classes: int, val_fraction: float = 0.2, seed: int = 0
) -> tuple[dict[str, list[tuple[str, bytes, int]]], list[str]]:
    """The photo set in memory, split per class: ``({"train": [...], "val": [...]}, class names)``."""
    items = list(_photos(n_images, n_classes, seed, (500, 375), 95))
    labels = np.array([c for c, _, _ in items])
    tr, va = stratified_split(labels, val_fraction, seed)
    named = [(f"class{c:03d}/img_{i:07d}.JPEG", data, c) for c, i, data in items]
    return {"train": [named[j] for j in tr], "val": [named[j] for j in va]}, [
        f"class{c:03d}" for c in range(n_classes)
    ]


def write_sample(
    name: str,
    out: str | Path,
    *,
    seed: int = 0,
    n_images: int = 600,
    n_classes: int = 6,
    val_fraction: float = 0.2,
    samples_per_shard: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[Manifest, Manifest]:
    """Write the built-in sample ``name`` as shard sets ``out/train`` and ``out/val``.

    ``digits`` (1,438 train / 359 val: 20 % of each class) or ``shifted-digits`` (the same split, each
    val digit at 5 places: 1,795 val images), 200 and 100 samples per shard by default so there are
    several shards to split across ranks; or ``photos`` (``n_images`` split ``val_fraction`` per class,
    100 per shard by default). Returns ``(train_manifest, val_manifest)``; both sets have the same classes.
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
    out = Path(out)
    if name in ("digits", "shifted-digits"):
        sets = (digits_images if name == "digits" else shifted_digits_images)(val_fraction, seed)
        classes = [str(c) for c in range(10)]
        spp = {"train": samples_per_shard or 200, "val": samples_per_shard or 100}
        desc = (
            f"sample:digits (sklearn digits upscaled to 32x32 RGB, seed {seed})"
            if name == "digits"
            else f"sample:shifted-digits (50-80 % of a 16x16 canvas, random place, seed {seed})"
        )
    else:
        sets, classes = photo_images(n_images, n_classes, val_fraction, seed)
        spp = {"train": samples_per_shard or 100, "val": samples_per_shard or 100}
        desc = f"sample:photos ({n_images} images, {n_classes} classes, seed {seed})"
    manifests = []
    for split in ("train", "val"):
        source = memory_source(f"sample-{name}-{split}", sets[split], classes)
        manifests.append(
            write_shards(
                source,
                out / split,
                split=split,
                samples_per_shard=spp[split],
                seed=seed,
                workers=1,
                overwrite=overwrite,
                progress=progress,
                source_name=f"{desc}, {split}",
            )
        )
    return manifests[0], manifests[1]


def sample_or_given(data: str | Path | None, name: str, tmp: str | Path) -> Path:
    """The shard root a benchmark reads: ``data`` when given (it must hold ``train/`` and ``val/``
    manifests), else the built-in sample ``name`` written under ``tmp``. Raises ValueError naming the
    missing manifest."""
    root = Path(data) if data else Path(tmp) / name
    if not data:
        write_sample(name, root)
    for split in ("train", "val"):
        if not (root / split / "manifest.json").is_file():
            raise ValueError(f"--data {root}: no {split}/manifest.json")
    return root
