"""Augmentation graphs: plain functions of their DALI inputs, separate from the reader wiring.

Like DALI's EfficientNet example, nothing here knows where the images come from: each function takes
decoded images (uint8 HWC, on ``device``) and returns DALI data nodes, so the same graph serves the
webdataset reader of :mod:`unmix.pipeline.loaders`, a file reader or an external source.

Recipes carry the papers' parameters:

- ``moco_v2`` (MoCo v2 "aug-plus", Chen et al. 2020): RandomResizedCrop scale 0.2-1, ratio 3/4-4/3;
  ColorJitter 0.4/0.4/0.4/0.1 with p=0.8; grayscale p=0.2; Gaussian blur sigma U(0.1, 2) p=0.5; flip.
- ``moco_v1``: RandomResizedCrop scale 0.2-1; ColorJitter 0.4/0.4/0.4/0.4 always; grayscale p=0.2; flip.
- ``moco_cifar`` (the MoCo CIFAR-10 demo and the Un-Mix authors' ``unmix_c10.py``/``unmix_c100.py``):
  RandomResizedCrop scale 0.08-1 (torchvision's default); ColorJitter 0.4/0.4/0.4/0.1 p=0.8; grayscale
  p=0.2; flip; no blur.
- ``simclr`` (Chen et al. 2020, ImageNet; colour distortion strength 1): RandomResizedCrop scale 0.08-1;
  ColorJitter 0.8/0.8/0.8/0.2 p=0.8; grayscale p=0.2; Gaussian blur sigma U(0.1, 2) p=0.5; flip.
- ``simclr_cifar`` (google-research/simclr README, CIFAR-10: ``--color_jitter_strength=0.5
  --use_blur=False``): RandomResizedCrop scale 0.08-1; ColorJitter 0.4/0.4/0.4/0.1 p=0.8; grayscale
  p=0.2; flip; no blur.
- ``byol`` (Grill et al. 2020, asymmetric): RandomResizedCrop scale 0.08-1; ColorJitter 0.4/0.4/0.2/0.1
  p=0.8; grayscale p=0.2; blur p=1.0 / 0.1; solarize p=0 / 0.2; flip.

Every random choice is per sample and comes from the pipeline's seeded generators. Work that a coin
flip turns off is not computed: colour, blur and solarize run inside per-sample ``if`` branches
(``@pipeline_def(enable_conditionals=True)``), so only the samples whose coin came up pay for them.

Differences from torchvision that are inherent to DALI's operators (documented, not hidden):
``fn.color_twist`` applies brightness, contrast, saturation and hue as one linear colour transform in a
fixed order (torchvision shuffles the order), and its contrast is taken about mid-grey rather than the
image mean; grayscale is saturation 0 in the same YIQ transform (Y = 0.299 R + 0.587 G + 0.114 B, the
ITU-R 601 luma torchvision uses), so jitter and grayscale cost one pass together. The blur kernel is
``blur_window(crop)`` pixels wide (23 at 224, about 10 % of the crop, as in BYOL and SimCLR).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from nvidia.dali import fn, types
from nvidia.dali import math as dmath
from nvidia.dali.data_node import DataNode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("CHW", "HWC")  # float output layouts: CHW, or HWC for channels_last models


@dataclass(frozen=True)
class ViewSpec:
    """Parameters of one augmented view (the probabilities are per sample)."""

    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area fraction
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    p_solarize: float = 0.0
    p_flip: float = 0.5

    def without_randomness(self) -> ViewSpec:
        """The same view with every coin-flip probability 0: a plain random resized crop."""
        return dataclasses.replace(self, p_jitter=0.0, p_gray=0.0, p_blur=0.0, p_solarize=0.0, p_flip=0.0)


@dataclass(frozen=True)
class Recipe:
    """A named pair of view specifications (view 1 is the query/online view that Un-Mix mixes)."""

    name: str
    view1: ViewSpec
    view2: ViewSpec = field(default=None)  # type: ignore[assignment]  # None: same as view1

    def __post_init__(self) -> None:
        if self.view2 is None:
            object.__setattr__(self, "view2", self.view1)

    def without_randomness(self) -> Recipe:
        """All probabilities 0 in both views (test hook: a view is then a plain resized crop)."""
        return Recipe(self.name + "-plain", self.view1.without_randomness(), self.view2.without_randomness())


_MOCO_V2 = ViewSpec()
_BYOL = ViewSpec(scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), p_blur=1.0)
_SIMCLR = ViewSpec(scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2))  # strength s: 0.8s/0.8s/0.8s/0.2s
RECIPES: dict[str, Recipe] = {
    "moco_v2": Recipe("moco_v2", _MOCO_V2),
    "moco_v1": Recipe("moco_v1", ViewSpec(jitter=(0.4, 0.4, 0.4, 0.4), p_jitter=1.0, p_blur=0.0)),
    "moco_cifar": Recipe("moco_cifar", ViewSpec(scale=(0.08, 1.0), p_blur=0.0)),
    "byol": Recipe("byol", _BYOL, dataclasses.replace(_BYOL, p_blur=0.1, p_solarize=0.2)),
    "simclr": Recipe("simclr", _SIMCLR),
    "simclr_cifar": Recipe(
        "simclr_cifar", dataclasses.replace(_SIMCLR, jitter=(0.4, 0.4, 0.4, 0.1), p_blur=0.0)
    ),
}


def get_recipe(recipe: str | Recipe) -> Recipe:
    """Resolve a recipe name (a key of :data:`RECIPES`) or pass a Recipe through."""
    if isinstance(recipe, Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[recipe]


def blur_window(crop: int) -> int:
    """Gaussian blur kernel width: about 10 % of the crop, odd (23 at 224)."""
    w = int(0.1 * crop)
    return max(3, w if w % 2 else w + 1)


def _coin(p: float):
    """Per-sample boolean coin flip with probability ``p``."""
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def random_view(images, spec: ViewSpec, crop: int):
    """One augmented view: random resized crop, colour jitter, grayscale, blur, solarize (uint8 HWC).

    ``images``: decoded uint8 HWC RGB images (CPU or GPU). The flip is *not* applied here; it is folded
    into :func:`normalize` (pass ``flip_coin(spec)``), which costs nothing extra there. Flipping commutes
    with all the pointwise colour operations and the symmetric blur, so the order is the papers'.
    """
    x = fn.random_resized_crop(
        images, size=[crop, crop], random_area=list(spec.scale), random_aspect_ratio=list(spec.ratio)
    )
    b, c, s, h = spec.jitter
    if spec.p_jitter > 0 or spec.p_gray > 0:
        # jitter and grayscale as one colour transform; identity factors where a coin is off
        jit = fn.cast(_coin(spec.p_jitter), dtype=types.FLOAT)
        keep_colour = 1.0 - fn.cast(_coin(spec.p_gray), dtype=types.FLOAT)
        brightness = 1.0 + jit * (fn.random.uniform(range=[1 - b, 1 + b]) - 1.0)
        contrast = 1.0 + jit * (fn.random.uniform(range=[1 - c, 1 + c]) - 1.0)
        saturation = keep_colour * (1.0 + jit * (fn.random.uniform(range=[1 - s, 1 + s]) - 1.0))
        hue = jit * fn.random.uniform(range=[-360.0 * h, 360.0 * h])  # torchvision's hue is a fraction of 360
        if (jit > 0.5) | (keep_colour < 0.5):
            x = fn.color_twist(x, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
    if spec.p_blur > 0:
        if spec.p_blur >= 1.0:
            x = gaussian_blur(x, spec.blur_sigma, crop)
        elif _coin(spec.p_blur):
            x = gaussian_blur(x, spec.blur_sigma, crop)
    if spec.p_solarize > 0 and _coin(spec.p_solarize):
        x = solarize(x)
    return x


def gaussian_blur(x, sigma_range: tuple[float, float], crop: int):
    """Gaussian blur, sigma ~ U(sigma_range) per sample, with the recipes' ``blur_window(crop)``-wide kernel.

    See :func:`blur_with_sigma` for how it is computed.
    """
    lo, hi = sigma_range
    sigma = lo if lo == hi else fn.random.uniform(range=[lo, hi])  # a fixed sigma: tests, ablations
    return blur_with_sigma(x, sigma, crop)


def blur_with_sigma(x, sigma, crop: int):
    """Gaussian blur of uint8 HWC ``x`` with standard deviation ``sigma`` (a float, or a per-sample node).

    The kernel is the ``blur_window(crop)``-tap Gaussian cut per sample to ``2 * ceil(4 * sigma) + 1``
    taps (the weight beyond 4 sigma is < 7e-5 of the total: the same result to within uint8 rounding,
    tested), normalised to sum 1, and applied as two 1-D passes of ``fn.filter`` (vertical, then
    horizontal; uint8 in between, so at most one grey level from the exact blur; borders reflect without
    repeating the edge, like ``fn.gaussian_blur`` and torchvision). On the CPU, ``fn.filter`` runs
    OpenCV's vectorised filtering: about 7x faster than ``fn.gaussian_blur`` for the same kernel. The
    kernels are built on the host from the sample's sigma; on the GPU ``fn.filter`` takes them from there.
    """
    k = blur_window(crop)
    offsets = fn.constant(fdata=[float(i - k // 2) for i in range(k)], shape=[k], device="cpu")
    if not isinstance(sigma, DataNode):  # one graph for a fixed sigma too: kernels always on the host
        sigma = fn.constant(fdata=float(sigma), shape=[], device="cpu")
    taps = dmath.min(fn.cast(2.0 * dmath.ceil(4.0 * sigma) + 1.0, dtype=types.INT32), k)
    t = fn.slice(offsets, start=(k - taps) // 2, shape=taps, axes=[0])
    w = dmath.exp(-0.5 * (t / sigma) ** 2)
    w = w / fn.reductions.sum(w)
    return fn.filter(fn.filter(x, fn.reshape(w, shape=[-1, 1])), fn.reshape(w, shape=[1, -1]))


def solarize(x, threshold: int = 128):
    """Invert pixels >= threshold (PIL's solarize): 255 - v == v XOR 255 for uint8."""
    return x ^ fn.cast((x >= threshold) * 255, dtype=types.UINT8)


def flip_coin(spec: ViewSpec):
    """Per-sample horizontal flip decision (int32 0/1, as ``crop_mirror_normalize``'s ``mirror`` wants)."""
    return fn.random.coin_flip(probability=spec.p_flip)


def normalize(x, mirror=0, crop: int | None = None, layout: str = "CHW"):
    """uint8 HWC -> float32 ``layout`` (CHW, or HWC for channels_last models) normalised with ImageNet
    mean/std, optional flip and centre crop."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    kwargs = {"crop": [crop, crop]} if crop else {}
    return fn.crop_mirror_normalize(
        x,
        dtype=types.FLOAT,
        output_layout=layout,
        mean=[255 * m for m in IMAGENET_MEAN],
        std=[255 * s for s in IMAGENET_STD],
        mirror=mirror,
        **kwargs,
    )


def two_views(images, recipe: Recipe, crop: int, layout: str = "CHW"):
    """The two self-supervised views of ``images``: float32 ``layout``, normalised, each with its own flip."""
    v1 = normalize(random_view(images, recipe.view1, crop), flip_coin(recipe.view1), layout=layout)
    v2 = normalize(random_view(images, recipe.view2, crop), flip_coin(recipe.view2), layout=layout)
    return v1, v2


def eval_train_view(images, crop: int, layout: str = "CHW"):
    """Linear-evaluation training transform: RandomResizedCrop(crop) (scale 0.08-1) + flip + normalise."""
    x = fn.random_resized_crop(images, size=[crop, crop], random_area=[0.08, 1.0])
    return normalize(x, fn.random.coin_flip(probability=0.5), layout=layout)


SMALL_IMAGE_MAX_CROP = 64  # at or below: small-image (CIFAR) conventions, as the small ResNet stem


def val_resize(crop: int) -> int:
    """The shorter side the validation transform resizes to: crop*256/224 (ImageNet), or ``crop`` itself
    for small images (<= 64: CIFAR's evaluation uses the 32x32 image as is, no resize-and-crop margin)."""
    return crop if crop <= SMALL_IMAGE_MAX_CROP else round(crop * 256 / 224)


def eval_val_view(images, crop: int, layout: str = "CHW"):
    """Validation transform: shorter side to :func:`val_resize`, centre crop ``crop``, normalise."""
    x = fn.resize(images, resize_shorter=val_resize(crop))
    return normalize(x, 0, crop=crop, layout=layout)
