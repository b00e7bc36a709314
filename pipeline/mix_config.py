"""The Un-Mix settings: one object for the pipeline (:mod:`unmix.pipeline.mixing`) and the trainer.

The trainer's ``unmix:`` config section *is* this class (:mod:`unmix.training.config` imports it; the pipeline
imports nothing from ``training``). It imports neither DALI nor torch, so reading a config stays cheap.

Options beyond the paper (off by default): ``per_sample_lambda`` (a lam and a box per sample; the mode
stays per batch), which every loss pairs correctly (:func:`unmix.training.losses.unmix_weighted`: the reversed
mixture carries ``1 - lam.flip(0)``); and ``random_partner`` (a random permutation without fixed points
instead of the reversal; the loader then also returns the partner indices). The losses pair each
mixture with its partner by ``flip(0)``, so the trainer refuses ``random_partner`` (:func:`for_trainer`);
it is for pipeline users who pair by the returned indices themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class UnmixConfig:
    """Un-Mix settings. ``enabled=False`` (or ``unmix=None`` in the loaders) computes no mixture.

    The pipeline's default is on (``UnmixConfig()`` mixes); the trainer's ``unmix`` section defaults to
    ``enabled: false``. Invalid values raise ``ValueError`` naming the key (``unmix.<field>``).
    """

    enabled: bool = True  # Un-Mix on/off (the loader then also yields `mixed` and `lam`)
    p_mixup: float = 0.5  # probability that a batch is mixed globally (mixup) rather than by a box (CutMix)
    alpha: float = 1.0  # lam ~ Beta(alpha, alpha), alpha > 0; one per batch (per sample: per_sample_lambda)
    # a lam and a box per sample (the mode stays per batch); DALI loader only (data.source=synthetic
    # refuses it)
    per_sample_lambda: bool = False
    # pipeline only: a random partner permutation instead of the reversal (the trainer refuses it: its losses
    # pair each mixture with its partner by the reversal)
    random_partner: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_mixup <= 1.0:
            raise ValueError(f"unmix.p_mixup: invalid value {self.p_mixup!r}; must be in [0, 1]")
        if self.alpha <= 0:
            raise ValueError(f"unmix.alpha: invalid value {self.alpha!r}; must be > 0")

    @classmethod
    def resolve(cls, unmix: UnmixConfig | Mapping | bool | None) -> UnmixConfig:
        """Accept a config, a dict of its fields (``enabled`` defaults to true), True/False or None
        (None/False: disabled)."""
        if unmix is None or unmix is False:
            return cls(enabled=False)
        if unmix is True:
            return cls()
        if isinstance(unmix, UnmixConfig):
            return unmix
        if isinstance(unmix, Mapping):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(unmix) - names)
            if unknown:
                raise ValueError(f"unknown unmix option(s) {unknown}; valid: {sorted(names)}")
            return cls(**dict(unmix))
        raise TypeError(f"unmix must be None, bool, dict or UnmixConfig, got {type(unmix).__name__}")


def for_trainer(cfg: UnmixConfig) -> UnmixConfig:
    """``cfg`` if the trainer's losses can pair its mixtures, else ``ValueError`` naming the key."""
    if cfg.random_partner:
        raise ValueError(
            "unmix.random_partner: not supported by the trainer: its losses pair each mixture with its "
            "partner by the batch reversal (flip(0)); set it to false (it is a pipeline option)"
        )
    return cfg
