"""One attention dispatch for every Eso-LM mask: dense SDPA, FlexAttention, flash-attn.

``plan_attention`` looks at the masks once per forward pass and returns an
:class:`AttentionPlan` that every layer calls; ``plan.backend`` says which kernel ran.
- ``sdpa``: boolean [R, 1, S, S] mask through torch SDPA. The reference; used on CPU.
- ``flex``: FlexAttention with the same predicate as ``mask_mod`` (GPU; forward also on CPU,
  where its backward is not supported); block masks from esolm_dist.kernels.flex_masks.
- ``flash``: flash-attn's variable-length causal kernel, only when every row is two plain
  causal segments (Eso-LM (B) diffusion rows), CUDA and bf16/fp16.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esolm_dist.eso.masks import RowMaskSpec, diffusion_allowed

BACKENDS = ("sdpa", "flex", "flash")


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()


def choose_backend(requested: str, masks: RowMaskSpec, device: torch.device, dtype: torch.dtype,
                   needs_grad: bool) -> str:
    """The kernel for these masks: ``requested`` unless it cannot run them, else the best that can."""
    on_gpu = device.type == "cuda"
    flash_ok = (on_gpu and flash_attn_available() and dtype in (torch.float16, torch.bfloat16)
                and masks.segments_if_causal())
    flex_ok = on_gpu or not needs_grad  # FlexAttention has no CPU backward
    if requested == "flash":
        if not flash_ok:
            raise ValueError("model.attention_backend=flash needs CUDA, bf16/fp16, flash-attn installed and "
                             "plain causal masks (Eso-LM (B) diffusion rows); use auto")
        return "flash"
    if requested == "flex":
        if not flex_ok:
            raise ValueError("model.attention_backend=flex cannot train on CPU (FlexAttention has no CPU "
                             "backward); use sdpa or auto")
        return "flex"
    if requested == "sdpa":
        return "sdpa"
    if flash_ok:
        return "flash"
    return "flex" if on_gpu else "sdpa"


@dataclass
class AttentionPlan:
    """Prepared masks for one forward pass; call it with q, k, v [R, H, S, D]."""

    backend: str
    dense_mask: torch.Tensor | None = None
    block_mask: object = None
    cu_seqlens: torch.Tensor | None = None
    segment_len: int = 0

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=self.dense_mask)
        if self.backend == "flex":
            return _flex_attention()(q, k, v, block_mask=self.block_mask)
        return _flash_segments(q, k, v, self.cu_seqlens, self.segment_len)


def plan_attention(masks: RowMaskSpec, device: torch.device, dtype: torch.dtype, requested: str = "auto",
                   needs_grad: bool = True, num_heads: int = 1) -> AttentionPlan:
    backend = choose_backend(requested, masks, device, dtype, needs_grad)
    if backend == "sdpa":
        return AttentionPlan("sdpa", dense_mask=masks.dense(device))
    if backend == "flex":
        from esolm_dist.kernels.flex_masks import flex_block_mask

        return AttentionPlan("flex", block_mask=flex_block_mask(masks, device))
    rows = masks.kinds.shape[0]
    cu_seqlens = torch.arange(0, 2 * rows + 1, device=device, dtype=torch.int32) * masks.seq_len
    return AttentionPlan("flash", cu_seqlens=cu_seqlens, segment_len=masks.seq_len)


@functools.cache
def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    if torch.cuda.is_available():
        return torch.compile(flex_attention, dynamic=False)
    return flex_attention


def _flash_segments(q, k, v, cu_seqlens, segment_len):
    """Rows of two causal segments -> flash-attn varlen over 2R sequences of length L."""
    from flash_attn import flash_attn_varlen_func

    rows, heads, seq, dim = q.shape
    flat = [t.transpose(1, 2).reshape(rows * seq, heads, dim) for t in (q, k, v)]
    out = flash_attn_varlen_func(*flat, cu_seqlens, cu_seqlens, segment_len, segment_len, causal=True)
    return out.view(rows, seq, heads, dim).transpose(1, 2)


# ---- sampling: a chunk of queries after a KV cache ------------------------------------------------

def choose_cached_backend(q: torch.Tensor, mask: torch.Tensor | None) -> str:
    """flash-attn for the plain "cache + causal chunk" pattern on CUDA in bf16/fp16, SDPA otherwise."""
    if mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_attn_available():
        return "flash"
    return "sdpa"


def attend_after_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       backend: str) -> torch.Tensor:
    """Queries [B, H, S, D] of a chunk over keys [B, H, C + S, D] (C cached rows first).

    ``mask`` None means every query sees all cached rows and the chunk causally (aligned to the
    bottom right, flash-attn's convention); otherwise a boolean [B or 1, 1, S, C + S], True = attend.
    """
    if backend == "flash":
        from flash_attn import flash_attn_func

        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    if mask is None:
        mask = cached_chunk_mask(q.shape[-2], k.shape[-2], q.device)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cached_chunk_mask(chunk: int, total: int, device: torch.device) -> torch.Tensor | None:
    """Boolean [chunk, total]: each of a chunk's queries sees the total - chunk cached rows and the
    chunk causally (the Eso-LM (B) diffusion mask of queries total - chunk, ...). None when nothing
    is cached (plain causal: SDPA's is_causal)."""
    if chunk == total:
        return None
    keys = torch.arange(total, device=device)
    return diffusion_allowed(keys[total - chunk:, None], keys, 0, "B")
