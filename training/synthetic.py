"""``data.source: synthetic``: random normalised images made on the device, mixed by the Un-Mix rule.

A stand-in for the DALI loader that needs no shards, no DALI and no decoding, so the training step can
be run and timed anywhere (``unmix bench gpu``, a node without the data). Batches have the loader's
keys, shapes and dtypes: ``view1``, ``view2`` ([B, 3, crop, crop]) and, with Un-Mix, ``mixed`` and
``lam`` ([B] float32), all on the target device. The two views are correlated (a shared base image plus
independent noise, scaled back to unit variance per pixel) so that the losses behave like on data.

The mixture follows the pipeline's rule exactly (``unmix.pipeline.mixing``, DESIGN.md section 3): the
partner is the batch reversed; one lam ~ Beta(alpha, alpha) per batch; with probability ``p_mixup`` a
global mixture ``lam * x + (1 - lam) * x.flip(0)``, otherwise one CutMix box for the batch (side
``floor(sqrt(1 - lam) * W)``, centre uniform on the pixel grid, clipped) copied from the partner, lam
recomputed as the unpasted fraction (:mod:`unmix.pipeline.torch_mixing`: :func:`draw_mix`, :func:`mix`).

Every batch is a function of ``(seed, shard_id, epoch, position)`` only, so ``state_dict`` is the
position and a resumed loader continues with exactly the batches an uninterrupted one would produce
(on the same device type: CPU and CUDA random streams differ). ``len()`` and the epoch semantics are
the DALI loader's: ``(samples // num_shards) // batch_size`` steps, leaving a loop early and iterating
again continues the same epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from unmix.pipeline.torch_mixing import draw_mix, mix


class SyntheticLoader:
    """Endless epochs of synthetic pretraining batches; the DALI loader's interface (see module doc)."""

    def __init__(
        self,
        batch_size: int,
        crop: int,
        *,
        samples: int,
        unmix: bool = False,
        p_mixup: float = 0.5,
        alpha: float = 1.0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        seed: int = 0,
        shard_id: int = 0,
        num_shards: int = 1,
        state: Mapping | None = None,
    ) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id={shard_id} must be in [0, num_shards={num_shards})")
        if unmix and batch_size < 2:
            raise ValueError(f"batch_size={batch_size}: Un-Mix needs at least 2 images per batch")
        self.batch_size, self.crop = batch_size, crop
        self.samples, self.unmix, self.p_mixup, self.alpha = samples, unmix, p_mixup, alpha
        self.device, self.dtype, self.channels_last = torch.device(device), dtype, channels_last
        self.seed, self.shard_id, self.num_shards = seed, shard_id, num_shards
        self.epoch, self.pos = 0, 0
        self._identity = {
            "kind": "synthetic",
            "batch_size": batch_size,
            "shard_id": shard_id,
            "num_shards": num_shards,
            "seed": seed,
            "crop": crop,
        }
        if len(self) == 0:
            raise ValueError(
                f"{samples} synthetic samples over {num_shards} shard(s) give fewer than one batch of "
                f"{batch_size} per rank"
            )
        if state is not None:
            self.load_state_dict(state)

    def __len__(self) -> int:
        return (self.samples // self.num_shards) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while self.pos < len(self):
            batch = self.batch(self.epoch, self.pos)
            self.pos += 1
            yield batch
        self.epoch += 1
        self.pos = 0

    def _images(self, g: torch.Generator, n_draws: int) -> list[Tensor]:
        B, S = self.batch_size, self.crop
        if self.channels_last:  # drawn as NHWC and viewed as NCHW: channels_last for free
            return [
                torch.randn(B, S, S, 3, generator=g, device=self.device).permute(0, 3, 1, 2)
                for _ in range(n_draws)
            ]
        return [torch.randn(B, 3, S, S, generator=g, device=self.device) for _ in range(n_draws)]

    def batch(self, epoch: int, pos: int) -> dict[str, Tensor]:
        """The batch at ``pos`` of ``epoch`` (a pure function of the seed, the shard and those two)."""
        seq = np.random.SeedSequence([self.seed, self.shard_id, epoch, pos])
        torch_seed, np_seed = (int(s) for s in seq.generate_state(2, dtype=np.uint32))
        g = torch.Generator(device=self.device).manual_seed(torch_seed)
        base, n1, n2 = self._images(g, 3)
        scale = 1.0 / math.sqrt(1.25)  # (base + 0.5 noise) back to unit variance
        view1 = ((base + 0.5 * n1) * scale).to(self.dtype)
        view2 = ((base + 0.5 * n2) * scale).to(self.dtype)
        out = {"view1": view1, "view2": view2}
        if self.unmix:
            draw = draw_mix(np.random.default_rng(np_seed), (self.crop, self.crop), self.p_mixup, self.alpha)
            out["mixed"], out["lam"] = mix(view1, draw)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The position after the last batch handed out, and the arguments a resume must match."""
        return {"epoch": self.epoch, "pos": self.pos, **self._identity}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a loader built with the same arguments)."""
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {key}={value!r}")
        if "pos" not in state or "epoch" not in state:
            raise ValueError("loader state has no 'epoch'/'pos' (not from SyntheticLoader.state_dict())")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


def build_synthetic_loader(cfg, micro_batch: int, rank: int, world: int) -> SyntheticLoader:
    """The synthetic loader for a training config (``data.source: synthetic``), on the run's device."""
    from unmix.pipeline.devices import local_cuda_index
    from unmix.training.engine import input_dtype

    device = torch.device("cuda", local_cuda_index()) if cfg.data.device == "gpu" else torch.device("cpu")
    channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else device.type == "cuda"
    return SyntheticLoader(
        micro_batch,
        cfg.data.crop,
        samples=cfg.data.synthetic_samples,
        unmix=cfg.unmix.enabled,
        p_mixup=cfg.unmix.p_mixup,
        alpha=cfg.unmix.alpha,
        device=device,
        dtype=input_dtype(cfg),
        channels_last=channels_last,
        seed=cfg.seed,
        shard_id=rank,
        num_shards=world,
    )
