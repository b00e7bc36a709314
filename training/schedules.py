"""Per-step schedules, computed by the loop and passed in (never hidden inside an optimizer)."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    base_lr: float,
    warmup_steps: int = 0,
    schedule: str = "cosine",
    milestone_steps: tuple[int, ...] = (),
) -> float:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to 0 at ``total_steps``.

    ``schedule="constant"`` keeps ``base_lr`` after the warm-up; ``"step"`` multiplies it by 0.1 at
    each of ``milestone_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule == "step":  # MoCo v1: x0.1 at each milestone
        return base_lr * 0.1 ** sum(step >= m for m in milestone_steps)
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
