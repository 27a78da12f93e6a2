"""Stop requests (SIGTERM, SIGUSR1): every rank finishes its step, saves, and exits cleanly."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Records a SIGTERM/SIGUSR1; ``agreed()`` makes all ranks see it at the same step.

    The flag travels over a gloo group on the host: asking every step costs a tiny CPU all-reduce
    and never waits for the GPU (an NCCL flag read back with ``.item()`` would sync the device each
    step). Construct it on every rank at the same point (it may create that group)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def stop_listening(self) -> None:
        """After the loop: ignore further stop requests (SLURM's resent SIGUSR1). An ignored signal stays
        ignored while Python shuts down, where a handled one is reset to its default, which kills."""
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank was signalled."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
