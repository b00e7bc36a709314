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
