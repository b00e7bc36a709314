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
        preempt._several = True  # as with several ranks (the collective itself is faked)
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


def _agree_worker(rank: int, port: int, out) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    preempt = Preemption(check_every=2)
    try:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
        out.put((rank, preempt._group is tdist.group.WORLD, [preempt.agreed(s) for s in (1, 2)]))
    finally:
        preempt.restore()
        tdist.destroy_process_group()


def test_two_gloo_ranks_agree_over_the_run_group():
    """Two real ranks: the signal reaches rank 1 only; both stop at the next check, over the run's own
    gloo group (no second group is created)."""
    import torch.multiprocessing as mp

    from unmix.training.dist import _free_port

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_agree_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert got == [(0, True, [False, True]), (1, True, [False, True])]


def test_gpu_runs_agree_over_nccl_with_a_cuda_flag(monkeypatch):
    """On NCCL the flag is a 1-element tensor on the current CUDA device over the run's group; no gloo group
    (which would bind to the host name's address across nodes) is created."""
    import torch
    import torch.distributed as tdist

    import unmix.training.dist as dist

    calls = []
    monkeypatch.setattr(tdist, "is_initialized", lambda: True)
    monkeypatch.setattr(tdist, "get_world_size", lambda group=None: 16)
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(tdist, "new_group", lambda *a, **k: calls.append("new_group"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(
        dist, "any_rank", lambda flag, device="cpu", group=None: calls.append((device, group))
    )
    preempt = Preemption(check_every=4)
    try:
        preempt.agreed(4)
    finally:
        preempt.restore()
    assert calls == [(torch.device("cuda", 3), tdist.group.WORLD)]
