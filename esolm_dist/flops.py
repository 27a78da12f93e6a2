"""Executed FLOPs of a training step and the device peak they are compared with (MFU)."""

from __future__ import annotations

import functools
import time

import torch

from esolm_dist.config import ModelConfig

# Dense bf16 tensor-core peak per device, by the name torch reports (first match wins).
PEAK_FLOPS_BY_NAME = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A6000", 155e12),
    ("A10", 125e12),
    ("V100", 125e12),
)


def forward_flops_per_row(cfg: ModelConfig, vocab_size: int, row_len: int) -> float:
    """Forward FLOPs of one row of ``row_len`` tokens, counting dense attention over the whole row.

    Per token: 2 x (QKV 3d^2 + out d^2 + FFN 2df) per layer + 2dV for the output layer,
    plus 2 x 2 x S x d per layer for QK^T and AV (SDPA computes the full S x S scores).
    """
    d, f, n = cfg.hidden_size, cfg.ffn_size, cfg.num_layers
    matmul = 2 * (n * (4 * d * d + 2 * d * f) + d * vocab_size)
    attention = n * 4 * row_len * d
    return row_len * (matmul + attention)


def train_flops_per_row(cfg: ModelConfig, vocab_size: int, row_len: int) -> float:
    """Forward + backward = 3 x forward."""
    return 3 * forward_flops_per_row(cfg, vocab_size, row_len)


@functools.cache
def measured_cpu_peak(size: int = 1024, repeats: int = 5) -> float:
    """The fp32 GEMM rate of this CPU (best of a few runs): the denominator of MFU on CPU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak_flops(device: torch.device) -> tuple[float, str]:
    """(peak FLOP/s, where it came from) for the device that trains."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_FLOPS_BY_NAME:
            if key in name:
                return peak, f"{name} (bf16 dense table)"
        return 0.0, f"{name} (unknown peak: MFU not reported)"
    return measured_cpu_peak(), "CPU (measured fp32 GEMM rate)"
