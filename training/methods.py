"""The method interface every self-supervised method implements, and the one registry of methods.

``method.name`` is looked up here and nowhere else: the loop, the benchmarks, SyncBatchNorm and config
validation ask the registry (:data:`METHODS`) or the method object (:class:`Method`), never compare the
name to a literal (a test scans the sources for that). Adding a method = an entry in :data:`METHODS`, its
module (a ``build`` function and a class implementing :class:`Method`), its config section
(``method.<section>`` in :mod:`unmix.training.config`), its YAML configs and its tests.

This module imports no torch (reading a config must stay cheap); the implementation module of a method
is imported when a run builds it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import Tensor, nn


class Method(Protocol):
    """What the training loop needs from a method; the online network itself lives in the engine.

    Per micro-step the loop calls, in order: ``targets`` (no gradient), the engine's forward of
    ``online_inputs``, ``loss``, backward and the optimizer step; at an optimizer-step boundary the
    EMA update of ``target`` (when there is one) at ``momentum(step)``; then ``gathered`` and, with its
    tensor concatenated from every rank, ``after_step`` (MoCo: the queue update).

    What crosses ranks: MoCo gathers images for Shuffle-BN inside ``targets`` and its keys through
    ``gathered``; SimCLR gathers embeddings, with their gradient, inside ``loss``; BYOL gathers nothing
    (SyncBatchNorm aside).
    """

    target: nn.Module | None  # EMA target network (fp32, outside the engine); None: no target (SimCLR)
    sync_bn: bool  # SyncBatchNorm in the online network on several CUDA processes
    sync_target: bool  # ... and in the target network too

    def online_inputs(self, batch: dict[str, Tensor], unmix: bool) -> tuple[Tensor, ...]:
        """The views the online network embeds, each in its own forward (mixture last)."""

    def targets(self, batch: dict[str, Tensor], generator: Any) -> tuple[Tensor, ...]:
        """Targets of the clean views, no gradient (MoCo keys, BYOL target projections; SimCLR: ())."""

    def loss(
        self, outs: tuple[Tensor, ...], targets: tuple[Tensor, ...], lam: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(loss, clean, mix)``: the loss to backpropagate, and its clean and Un-Mix parts (detached)."""

    def momentum(self, step: int, total_steps: int) -> float:
        """The EMA momentum of the target at ``step`` (0.0 where there is no target)."""

    def gathered(self, targets: tuple[Tensor, ...]) -> Tensor | None:
        """This rank's part of what every rank needs after the step (MoCo: its keys), or None."""

    def after_step(self, gathered: Tensor) -> None:
        """Use the tensor :meth:`gathered` returned, concatenated over ranks (MoCo: enqueue the keys)."""

    def replicated(self) -> list[Tensor]:
        """Tensors that must start identical on every rank (rank 0's are broadcast at set-up)."""

    def expected_unmix_cost(self) -> str:
        """What Un-Mix should cost per step, for ``unmix bench train`` to print beside the measurement."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass(frozen=True)
class MethodSpec:
    """One registered method: where its code and config section are, and its defaults."""

    name: str  # the value of method.name
    section: str  # its config section, method.<section>
    module: str  # the implementation: a module with build(backbone, cfg, section, world, micro, device)
    recipe: str  # the default data.recipe (pipeline/augment.py RECIPES)
    optimizer: str  # the paper's optimizer at ZeRO 0 (unmix bench gpu's ResNet-50 recipe)
    section_defaults: dict = field(default_factory=dict)  # section values filled where the config has None

    def load(self):
        """The implementation module."""
        return importlib.import_module(self.module)


_MOCO, _BYOL, _SIMCLR = "unmix.training.moco", "unmix.training.byol", "unmix.training.simclr"
METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        # MoCo v2 (Chen et al. 2020): MLP head, T 0.2; MoCo v1 (He et al. 2020): linear head, T 0.07
        MethodSpec(
            "moco_v2",
            "moco",
            _MOCO,
            recipe="moco_v2",
            optimizer="sgd",
            section_defaults={"T": 0.2, "mlp": True},
        ),
        MethodSpec(
            "moco_v1",
            "moco",
            _MOCO,
            recipe="moco_v1",
            optimizer="sgd",
            section_defaults={"T": 0.07, "mlp": False},
        ),
        MethodSpec("byol", "byol", _BYOL, recipe="byol", optimizer="lars"),  # Grill et al. 2020
        MethodSpec("simclr", "simclr", _SIMCLR, recipe="simclr", optimizer="lars"),  # Chen et al. 2020
    )
}


def names() -> tuple[str, ...]:
    """Every valid ``method.name``."""
    return tuple(METHODS)


def one_per_module() -> tuple[str, ...]:
    """The first name of each implementation module (MoCo v1 shares MoCo v2's code): what a check that
    exercises every implementation once runs."""
    first: dict[str, str] = {}
    for name, s in METHODS.items():
        first.setdefault(s.module, name)
    return tuple(first.values())


def spec(name: str) -> MethodSpec:
    """The registered method ``name``; ``KeyError`` naming the choices otherwise."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[name]


def section(cfg: Any) -> Any:
    """The config section of ``cfg``'s method (``cfg.method.moco`` for MoCo v1/v2, ...)."""
    return getattr(cfg.method, spec(cfg.method.name).section)


def build(
    cfg: Any, backbone: nn.Module, world: int, micro_batch: int, device: Any
) -> tuple[nn.Module, Method]:
    """``(online, method)`` for ``cfg``: the online network on ``device`` and the method object around it.

    The method's target network (if any) is copied from the online network before anything converts it
    (SyncBatchNorm) or casts it (DeepSpeed).
    """
    return spec(cfg.method.name).load().build(backbone, cfg, section(cfg), world, micro_batch, device)
