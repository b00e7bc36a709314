"""The preemption flag: start-up signals are recorded and handed over; handlers are restored."""

from __future__ import annotations

import os
import signal

from unmix.training.preemption import Preemption, record_early


def test_signal_during_startup_is_handed_to_preemption(capsys):
    original = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)
    record_early()
    assert signal.getsignal(signal.SIGUSR1) not in original[:1]
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the recorder
    preempt = Preemption()
    try:
        assert preempt.signum == signal.SIGUSR1
        assert preempt.agreed()
        assert "received SIGUSR1 during start-up" in capsys.readouterr().err
    finally:
        preempt.restore()
    # The handlers from before the recorder are back, not the recorder's.
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == original
    # A later Preemption starts clean.
    preempt = Preemption()
    try:
        assert preempt.signum is None and not preempt.agreed()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.signum == signal.SIGTERM and preempt.agreed()
    finally:
        preempt.restore()
    assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM)) == original


def test_ranks_compare_flags_every_n_steps_and_at_forced_checks(monkeypatch):
    """Several ranks: the all-reduce runs every ``check_every`` steps (and when forced), not every step."""
    import unmix.training.dist as dist

    calls: list[bool] = []

    def fake_any_rank(flag, device="cpu", group=None):
        calls.append(flag)
        return flag

    monkeypatch.setattr(dist, "any_rank", fake_any_rank)
    preempt = Preemption(check_every=5)
    try:
        preempt._group = object()  # as with several ranks (the collective itself is faked)
        os.kill(os.getpid(), signal.SIGUSR1)
        seen = [step for step in range(1, 13) if preempt.agreed(step)]
        assert seen == [5, 10] and len(calls) == 2  # no communication between the checks
        assert preempt.agreed(11, force=True) and len(calls) == 3  # epoch end: always compared
        assert preempt.agreed() and len(calls) == 4  # no step given: compared
    finally:
        preempt.restore()
    one = Preemption(check_every=5)  # one process: no collective, the signal is seen at once
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert one.agreed(1)
    finally:
        one.restore()


def test_check_every_must_be_positive():
    import pytest

    with pytest.raises(ValueError, match="check_every"):
        Preemption(check_every=0)
