"""The loop's metric accumulation against sums computed by hand: window means over micro-steps, the epoch
loss, throughput and data wait on a fake clock, the first non-finite step, and the resets."""

from __future__ import annotations

import math

import pytest
import torch

from unmix.training.step_metrics import StepMetrics


class Clock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x)


def test_window_means_over_micro_steps_and_the_epoch_loss():
    clock = Clock()
    m = StepMetrics(torch.device("cpu"), world=1, accum=2, global_batch=64, unmix=True, clock=clock)
    assert m.window() is None  # nothing yet: nothing logged, the interval goes on
    # step 1: micro-steps (loss, clean, mix, λ per sample)
    m.add(1, _t(4.0), _t(3.0), _t(1.0), torch.tensor([0.2, 0.4]))
    m.add(1, _t(2.0), _t(1.5), _t(0.5), torch.tensor([0.6, 0.6]))
    m.stepped(lr=0.1, momentum=0.99)
    m.add(2, _t(6.0), _t(5.0), _t(1.0), torch.tensor([1.0, 0.0]))
    m.add(2, _t(0.0), _t(0.0), _t(0.0), torch.tensor([0.1, 0.1]))
    m.stepped(lr=0.05, momentum=0.995)
    clock.now += 4.0  # 2 steps x 64 images in 4 s
    metrics, steps, seconds = m.window()
    assert (steps, seconds) == (2, 4.0)
    assert metrics["loss"] == pytest.approx((4 + 2 + 6 + 0) / 4)
    assert metrics["loss_clean"] == pytest.approx((3 + 1.5 + 5 + 0) / 4)
    assert metrics["loss_mix"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert metrics["lam"] == pytest.approx((0.3 + 0.6 + 0.5 + 0.1) / 4)  # mean of the per-batch means
    assert (metrics["lr"], metrics["momentum"]) == (0.05, 0.995)  # of the last step
    assert metrics["images_per_s"] == pytest.approx(2 * 64 / 4.0)
    assert metrics["data_wait_fraction"] == 0.0
    # the next window starts empty; the epoch's sum runs on
    m.add(3, _t(1.0), _t(1.0), _t(0.0), torch.tensor([0.5]))
    m.add(3, _t(3.0), _t(2.0), _t(1.0), torch.tensor([0.5]))
    m.stepped(lr=0.01, momentum=1.0)
    clock.now += 1.0
    metrics, steps, seconds = m.window()
    assert (steps, seconds, metrics["loss"]) == (1, 1.0, pytest.approx(2.0))
    assert m.epoch_loss() == pytest.approx((4 + 2 + 6 + 0 + 1 + 3) / 6)
    assert m.epoch_loss() is None  # reset: no step in the new epoch yet
    assert m.first_nonfinite() is None


def test_without_unmix_no_lam_is_logged_and_a_given_lam_is_ignored():
    m = StepMetrics(torch.device("cpu"), world=1, accum=1, global_batch=8, unmix=False, clock=Clock())
    m.add(1, _t(2.0), _t(2.0), _t(0.0), None)
    m.stepped(0.1, 0.9)
    assert "lam" not in m.window()[0]


def test_data_wait_is_the_time_spent_in_next_over_the_window():
    clock = Clock()
    m = StepMetrics(torch.device("cpu"), world=1, accum=1, global_batch=8, unmix=False, clock=clock)

    def batches():
        for i in range(3):
            clock.now += 0.5  # the loader takes 0.5 s per batch
            yield {"i": i}
        clock.now += 0.25  # and 0.25 s to say the epoch is over

    seen = []
    for batch in m.timed(batches()):
        seen.append(batch["i"])
        clock.now += 1.5  # the step
        m.add(len(seen), _t(1.0), _t(1.0), _t(0.0), None)
        m.stepped(0.1, 0.9)
    metrics, steps, seconds = m.window()
    assert seen == [0, 1, 2] and steps == 3
    assert seconds == pytest.approx(3 * 2.0 + 0.25)
    assert metrics["data_wait_fraction"] == pytest.approx((3 * 0.5 + 0.25) / 6.25)
    assert metrics["images_per_s"] == pytest.approx(3 * 8 / 6.25)


def test_first_nonfinite_step_is_kept_and_not_overwritten():
    m = StepMetrics(torch.device("cpu"), world=1, accum=1, global_batch=8, unmix=False, clock=Clock())
    m.add(1, _t(1.0), _t(1.0), _t(0.0), None)
    assert m.first_nonfinite() is None
    m.add(2, _t(math.nan), _t(math.nan), _t(0.0), None)
    m.add(3, _t(math.inf), _t(1.0), _t(0.0), None)
    m.add(4, _t(1.0), _t(1.0), _t(0.0), None)
    assert m.first_nonfinite() == 2
    m.window()
    m.epoch_loss()
    assert m.first_nonfinite() == 2  # only a new run clears it
