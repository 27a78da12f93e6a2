"""The small compatibility layer that lets megatron-core's tensor-parallel code run on CPU + gloo.

megatron-core 0.16 asks CUDA for the current device and synchronises CUDA streams in a
few places that are reachable on our path. On a CPU-only torch those calls raise, so we
answer them for the CPU. Applied once, only when CUDA is unavailable; never on GPU.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_compat() -> bool:
    """Patch the two CUDA queries megatron-core makes; returns True when applied."""
    global _applied
    if _applied or torch.cuda.is_available():
        return _applied
    torch.cuda.current_device = lambda: torch.device("cpu")  # buffers megatron allocates land on the CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None  # nothing to wait for on the CPU
    _applied = True
    return True
