"""NVIDIA apex's fused LayerNorm and FusedAdam on GPU when apex is installed; torch's otherwise.

NVIDIA apex is not on PyPI (``pip install apex`` installs an unrelated package of that name), so
it is recognised by what its CUDA build provides: ``apex.normalization.fused_layer_norm`` with
its extension ``fused_layer_norm_cuda`` (the function megatron-core's FusedLayerNorm wraps), and
``apex.optimizers.FusedAdam`` with its extension ``amp_C``. The choice follows the tensors'
device, so a CPU run on a machine with apex keeps torch's kernels.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch
from torch import nn


def _nvidia_apex(module: str, name: str, extension: str):
    """``module.name`` from NVIDIA apex when it and its CUDA extension are installed, else None."""
    try:
        found = importlib.util.find_spec(extension) is not None
        return getattr(importlib.import_module(module), name) if found else None
    except (ImportError, AttributeError):
        return None


@functools.cache
def apex_layer_norm():
    """apex's FusedLayerNormAffineFunction, or None."""
    return _nvidia_apex("apex.normalization.fused_layer_norm", "FusedLayerNormAffineFunction",
                        "fused_layer_norm_cuda")


@functools.cache
def apex_fused_adam():
    """apex's FusedAdam class, or None."""
    return _nvidia_apex("apex.optimizers", "FusedAdam", "amp_C")


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (same parameters and checkpoints) whose CUDA forward runs apex's fused kernel
    when NVIDIA apex is installed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = apex_layer_norm() if x.is_cuda else None
        if fused is None:
            return super().forward(x)
        return fused.apply(x, self.weight, self.bias, self.normalized_shape, self.eps)


def adamw(params, device: torch.device, lr: float, betas: tuple[float, float], eps: float,
          weight_decay: float) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay): apex's FusedAdam on GPU when installed, torch's AdamW otherwise."""
    fused = apex_fused_adam() if device.type == "cuda" else None
    if fused is not None:
        return fused(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adam_w_mode=True)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def describe(device: torch.device, optimizer: torch.optim.Optimizer) -> str:
    """Which LayerNorm kernel runs on ``device`` and which optimizer was built (one start-up line)."""
    norm = "apex fused (NVIDIA apex)" if device.type == "cuda" and apex_layer_norm() else "torch"
    kind = type(optimizer)
    line = f"LayerNorm {norm}, optimizer {kind.__name__} ({kind.__module__.split('.')[0]})"
    if device.type == "cuda" and not (apex_layer_norm() and apex_fused_adam()):
        line += "; NVIDIA apex with its CUDA extensions is not installed (README: fused kernels)"
    return line
