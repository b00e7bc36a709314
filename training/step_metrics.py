"""The training loop's metrics: running sums on the device, read once per logging interval.

Host-device syncs stay out of the step: :meth:`StepMetrics.add` only adds device tensors, and the sums
are read (one sync, averaged over ranks) by :meth:`StepMetrics.window` every ``log.every_steps`` and by
:meth:`StepMetrics.epoch_loss` at the end of an epoch. A non-finite loss is recorded on the device as the
first bad optimizer step and read by :meth:`StepMetrics.first_nonfinite`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

_NONE = 2**62  # "no bad step" in the MIN all-reduce


class StepMetrics:
    """Per-window means of loss / loss_clean / loss_mix / λ, throughput and data wait; per-epoch loss.

    Args:
        device: where the sums live (the loss's device).
        world: processes; the window's means are averaged over them (all-reduce: call on every rank).
        accum: micro-steps per optimizer step (a mean is over micro-steps).
        global_batch: images per optimizer step over all ranks (for images/s).
        unmix: log ``lam`` (the mean mixing weight) too.
        clock: seconds, monotonic (tests pass their own).
    """

    def __init__(
        self,
        device: torch.device,
        world: int,
        accum: int,
        global_batch: int,
        unmix: bool,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.device, self.world, self.accum = device, world, accum
        self.global_batch, self.unmix, self.clock = global_batch, unmix, clock
        self.lr, self.momentum = 0.0, 0.0  # of the last optimizer step
        self._sums = torch.zeros(4, device=device)  # Σ loss, loss_clean, loss_mix, λ over the window
        self._zero = torch.zeros((), device=device)
        self._epoch_sum = torch.zeros((), device=device)  # Σ loss over the epoch
        self._epoch_steps = 0
        self._first_bad = torch.full((), -1, dtype=torch.long, device=device)  # 1-based step, -1: none
        self._steps, self._start, self._wait = 0, clock(), 0.0

    def add(
        self,
        step: int,
        loss: torch.Tensor,
        loss_clean: torch.Tensor,
        loss_mix: torch.Tensor,
        lam: torch.Tensor | None,
    ) -> None:
        """One micro-step of optimizer step ``step`` (1-based): its losses (scalars on the device) and
        ``lam``, the batch's λ (N,; None without Un-Mix). No host sync."""
        lam = lam.float().mean().to(self.device) if self.unmix and lam is not None else self._zero
        self._sums += torch.stack([loss.float(), loss_clean.float(), loss_mix.float(), lam])
        self._epoch_sum += loss.float()
        self._first_bad = torch.where(
            torch.isfinite(loss) | (self._first_bad >= 0),
            self._first_bad,
            torch.full_like(self._first_bad, step),
        )

    def stepped(self, lr: float, momentum: float) -> None:
        """An optimizer step completed at learning rate ``lr`` and target momentum ``momentum``."""
        self.lr, self.momentum = lr, momentum
        self._steps += 1
        self._epoch_steps += 1

    def timed(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches``, counting the time spent waiting for each one as data wait."""
        it = iter(batches)
        while True:
            t0 = self.clock()
            batch = next(it, None)
            self._wait += self.clock() - t0
            if batch is None:
                return
            yield batch

    def first_nonfinite(self) -> int | None:
        """The first optimizer step (1-based, over all ranks) whose loss was NaN/inf; None if none.
        One sync; collective when ``world > 1``."""
        bad = torch.where(self._first_bad < 0, torch.full_like(self._first_bad, _NONE), self._first_bad)
        if self.world > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MIN)
        step = int(bad.item())
        return None if step >= _NONE else step

    def window(self) -> tuple[dict[str, float], int, float] | None:
        """``(metrics, steps, seconds)`` of the interval since the last call, and start a new one; None
        when no optimizer step completed in it. Collective when ``world > 1``.

        ``metrics``: loss, loss_clean, loss_mix (means over micro-steps and ranks), lr, momentum,
        images_per_s, data_wait_fraction, and lam with Un-Mix.
        """
        if self._steps == 0:
            return None
        means = self._sums / (self._steps * self.accum)
        if self.world > 1:
            torch.distributed.all_reduce(means)
            means = means / self.world
        loss, loss_clean, loss_mix, lam = means.tolist()  # the one host sync of the interval
        seconds = max(self.clock() - self._start, 1e-9)
        metrics = {
            "loss": loss,
            "loss_clean": loss_clean,
            "loss_mix": loss_mix,
            "lr": self.lr,
            "momentum": self.momentum,
            "images_per_s": self._steps * self.global_batch / seconds,
            "data_wait_fraction": self._wait / seconds,
        }
        if self.unmix:
            metrics["lam"] = lam
        steps = self._steps
        self._sums = torch.zeros_like(self._sums)
        self._steps, self._start, self._wait = 0, self.clock(), 0.0
        return metrics, steps, seconds

    def epoch_loss(self) -> float | None:
        """This rank's mean loss over the epoch's micro-steps (None if it had no optimizer step); resets."""
        value = (self._epoch_sum / (self._epoch_steps * self.accum)).item() if self._epoch_steps else None
        self._epoch_sum.zero_()
        self._epoch_steps = 0
        return value
