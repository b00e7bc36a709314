"""SIGUSR1/SIGTERM handling: finish the step, agree across ranks, checkpoint, exit with 75.

The handler only records the signal; the loop polls :meth:`Preemption.agreed` after every step, which
all-reduces the flag over a CPU (gloo) group so that every rank stops after the same step even when
the signal reached only one of them. A second signal while the checkpoint is written only sets the
flag again: it cannot interrupt the save (the checkpoint itself is also switched in atomically).
"""

from __future__ import annotations

import signal
import sys

import torch
import torch.distributed as dist

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed after SIGUSR1/SIGTERM, requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs the handlers on construction; :meth:`restore` puts the previous ones back."""

    def __init__(self, signals: tuple[signal.Signals, ...] = SIGNALS):
        self.signum: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}
        self._group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            # A gloo group: the flag is a CPU tensor, so polling it never syncs a GPU stream.
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            print(
                f"[unmix] received {signal.Signals(signum).name}: checkpointing after this step",
                file=sys.stderr,
            )
        self.signum = signum

    def agreed(self) -> bool:
        """True on every rank when any rank has received a signal (collective: call on all ranks)."""
        if self._group is None:
            return self.signum is not None
        flag = torch.tensor([0 if self.signum is None else 1], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
