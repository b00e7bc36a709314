"""Built-in sample data sets made from real images that installed dependencies ship (no network).

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled bicubically to
  32x32 RGB JPEG; classes ``"0" .. "9"``; stratified 80/20 train/val split with a fixed seed.
- ``photos``: ImageNet-like ~500x375 JPEGs (~100 KB) cut from real photographs (scikit-learn's
  ``china.jpg`` and ``flower.jpg``, matplotlib's ``grace_hopper.jpg``) by random crops, scales, flips and
  colour shifts. Class ``c`` uses photograph ``c % 3`` with a class-specific colour cast, so the classes
  are learnable. :func:`write_photo_tree` writes it as an ImageFolder tree (used by the benchmarks).

Everything is deterministic given the seed.
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from pipeline.shards import Manifest, write_shards

SAMPLES = ("digits", "photos")


def _digits_tree(root: Path, val_fraction: float, seed: int) -> tuple[Path, Path]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    idx = np.arange(len(d.target))
    tr, va = train_test_split(idx, test_size=val_fraction, stratify=d.target, random_state=seed)
    for split, ids in (("train", tr), ("val", va)):
        for i in ids:
            g = (d.images[i] * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)  # 8x8, 0..16 -> 0..255
            img = Image.fromarray(g, mode="L").resize((32, 32), Image.Resampling.BICUBIC).convert("RGB")
            cls_dir = root / split / str(d.target[i])
            cls_dir.mkdir(parents=True, exist_ok=True)
            img.save(cls_dir / f"digit_{i:04d}.jpg", format="JPEG", quality=95)
    return root / "train", root / "val"


def _base_photos() -> list[Image.Image]:
    import matplotlib.cbook as cbook
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]  # china, flower
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photos.append(Image.open(f).convert("RGB"))
    return photos


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
    """One random view of ``base``: crop (30-100 % of the area), resize to ``size``, flip, colour shift."""
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
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def write_photo_tree(
    out_dir: str | Path,
    n_images: int,
    n_classes: int = 10,
    seed: int = 0,
    size: tuple[int, int] = (500, 375),
    quality: int = 90,
) -> Path:
    """Write ``n_images`` ImageNet-like JPEGs as an ImageFolder tree ``out_dir/class<c>/<i>.JPEG``.

    Images are spread evenly over ``n_classes`` classes (``class000``, ``class001``, ...), named with the
    ImageNet-style ``.JPEG`` extension, ``size`` = (width, height) (default 500x375, about 100 KB each).
    Deterministic in ``seed``. Returns ``out_dir``.
    """
    if n_images < n_classes:
        raise ValueError(f"n_images ({n_images}) must be >= n_classes ({n_classes})")
    out = Path(out_dir)
    bases = _base_photos()
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        (out / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        c = i % n_classes
        img = make_photo(bases[c % len(bases)], rng, _class_gain(c, len(bases)), size)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        (out / f"class{c:03d}" / f"img_{i:07d}.JPEG").write_bytes(buf.getvalue())
    return out


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

    ``digits`` (1,437 train / 360 val; 200 and 100 samples per shard by default, so there are several
    shards to split across ranks) or ``photos`` (``n_images`` split ``val_fraction`` per class, 100 per
    shard by default). Returns ``(train_manifest, val_manifest)``; the val set uses the train set's classes.
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; choose from {', '.join(SAMPLES)}")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=f"unmix-{name}-") as tmp:
        tmp_root = Path(tmp)
        if name == "digits":
            train_src, val_src = _digits_tree(tmp_root, val_fraction, seed)
            spp_train, spp_val = samples_per_shard or 200, samples_per_shard or 100
            source = f"sample:digits (sklearn.datasets.load_digits, 32x32, seed {seed})"
        else:
            tree = write_photo_tree(tmp_root / "all", n_images, n_classes, seed)
            train_src, val_src = tmp_root / "train", tmp_root / "val"
            rng = np.random.default_rng(seed)
            for cls_dir in sorted(tree.iterdir()):
                files = sorted(cls_dir.iterdir())
                n_val = max(1, round(len(files) * val_fraction))
                pick = set(rng.choice(len(files), size=n_val, replace=False).tolist())
                for j, f in enumerate(files):
                    dest = (val_src if j in pick else train_src) / cls_dir.name
                    dest.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(f), dest / f.name)
            spp_train = spp_val = samples_per_shard or 100
            source = f"sample:photos ({n_images} images, {n_classes} classes, seed {seed})"
        common = dict(seed=seed, workers=1, overwrite=overwrite, progress=progress)
        train = write_shards(
            train_src,
            out / "train",
            split="train",
            samples_per_shard=spp_train,
            source_name=source + " train",
            **common,
        )
        val = write_shards(
            val_src,
            out / "val",
            split="val",
            samples_per_shard=spp_val,
            classes_from=out / "train",
            source_name=source + " val",
            **common,
        )
    return train, val
