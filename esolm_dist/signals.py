"""Stop requests (SIGTERM, SIGUSR1): every rank finishes its step, saves, and exits cleanly."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Records a SIGTERM/SIGUSR1; ``agreed()`` makes all ranks see it at the same step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, device: torch.device):
        self.device = device
        self.received: int | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """True on every rank as soon as any rank was signalled (one tiny all-reduce)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
