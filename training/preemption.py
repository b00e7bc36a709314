"""SIGUSR1/SIGTERM handling: finish the step, agree across ranks, checkpoint, exit with 75.

The handler only records the signal; the loop polls :meth:`Preemption.agreed` after every step. With
several ranks that poll all-reduces the flag over the run's own process group, so that every rank
stops after the same step even when the signal reached only one of them: on GPU runs the NCCL group (a
1-element CUDA tensor), on CPU runs the gloo group. No second group is created: a gloo group next to
NCCL would bind to whatever the host name resolves to (often a loopback address) unless
``GLOO_SOCKET_IFNAME`` names the right interface, and hang or fail across nodes. The all-reduce runs every
``checkpoint.signal_check_every`` steps (and at every epoch end), not every step: reading its result
waits for the queued GPU work and its latency grows with the number of ranks, while a preemption
notice (``--signal=USR1@90``) leaves tens of seconds. One process
needs no collective and sees its signal after the very next step. A second signal while the
checkpoint is written only sets the flag again: it cannot interrupt the save (the checkpoint itself
is also switched in atomically).

Start-up (importing torch, DeepSpeed's set-up, the rendezvous, loading a checkpoint) takes seconds to
minutes, and a signal then would kill the rank with the default action. :func:`record_early`, called
first thing by ``unmix train``, records such a signal instead; :class:`Preemption` takes it over, so
the run trains one step, checkpoints and exits 75 like any other preemption. This module imports torch
only when it is used, so that the early handlers are in place before torch loads.
"""

from __future__ import annotations

import signal
import sys

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed after SIGUSR1/SIGTERM, requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class _Early:
    """The start-up recorder's state: the signal received (if any) and the handlers it replaced."""

    signum: int | None = None
    previous: dict = {}


def _handle_early(signum, frame) -> None:
    if _Early.signum is None:
        print(
            f"[unmix] received {signal.Signals(signum).name} during start-up: "
            "checkpointing after the first step",
            file=sys.stderr,
            flush=True,
        )
    _Early.signum = signum


def record_early(signals: tuple[signal.Signals, ...] = SIGNALS) -> None:
    """Record ``signals`` from now until a :class:`Preemption` takes over (instead of dying of them)."""
    for s in signals:
        previous = signal.signal(s, _handle_early)
        _Early.previous.setdefault(s, previous)


def agreement_group():
    """``(group, device)`` the ranks compare their signal flags over: the run's own group, with the flag
    on the device its backend reduces (NCCL: the current CUDA device; gloo: the CPU)."""
    import torch
    import torch.distributed as dist

    backend = dist.get_backend()
    if backend == "nccl":
        return dist.group.WORLD, torch.device("cuda", torch.cuda.current_device())
    if backend == "gloo":
        return dist.group.WORLD, "cpu"
    raise RuntimeError(f"preemption: no signal agreement over a {backend!r} process group (nccl or gloo)")


class Preemption:
    """Installs the handlers on construction; :meth:`restore` puts the previous ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS, check_every: int = 1):
        import torch.distributed as dist

        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        self.check_every = check_every

        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        # Take over from the start-up recorder: its signal, and the handlers from before it.
        self.signum: int | None = _Early.signum
        self._previous.update({s: h for s, h in _Early.previous.items() if s in self._previous})
        _Early.signum, _Early.previous = None, {}
        self._several = dist.is_initialized() and dist.get_world_size() > 1
        self._group, self._device = agreement_group() if self._several else (None, "cpu")

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            print(
                f"[unmix] received {signal.Signals(signum).name}: checkpointing after this step",
                file=sys.stderr,
            )
        self.signum = signum

    def agreed(self, step: int | None = None, force: bool = False) -> bool:
        """True on every rank when any rank has received a signal (collective: call on all ranks).

        With several ranks the flags are compared only when ``step`` is a multiple of ``check_every``
        (or ``step`` is None, or ``force``); between those steps this returns False without any
        communication. Every rank passes the same ``step`` and ``force``, so all agree on when to stop.
        """
        if not self._several:
            return self.signum is not None
        if not force and step is not None and step % self.check_every:
            return False
        from unmix.training.dist import any_rank

        return any_rank(self.signum is not None, device=self._device, group=self._group)

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
