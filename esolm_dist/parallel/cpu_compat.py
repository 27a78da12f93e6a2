"""The small compatibility layer that lets megatron-core's tensor-parallel code run on CPU + gloo.

megatron-core 0.16 asks CUDA for the current device and synchronises CUDA streams in a
few places that are reachable on our path. On a CPU-only torch those calls raise, and on a
machine with GPUs they would put megatron's buffers on cuda:0 while the model trains on the
CPU, so whenever the chosen device is the CPU we answer them for the CPU. Applied once per
process, by esolm_dist.parallel.state.init_parallel, only when training on the CPU.
"""

from __future__ import annotations

import torch

_applied = False


def apply_cpu_compat() -> None:
    """Patch the two CUDA queries megatron-core makes (whether or not CUDA exists)."""
    global _applied
    if _applied:
        return
    torch.cuda.current_device = lambda: torch.device("cpu")  # buffers megatron allocates land on the CPU
    torch.cuda.synchronize = lambda *args, **kwargs: None  # nothing to wait for on the CPU
    _applied = True
