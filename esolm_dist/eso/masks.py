"""Attention-mask specs for Eso-LM (A) and (B) (paper section 2), in SORTED coordinates, and for
the baselines trained by the same framework (eso.model: ar, mdlm, bd3lm).

Every Eso-LM input is a batch of rows of 2L tokens, already gathered into their order:
- a DIFFUSION row packs two independent length-L sequences z_t (block-diagonal);
- a SEQUENTIAL row is [z0 ; x], both halves in the sequential order.
The baselines' rows keep the original order:
- a CAUSAL row (AR) is [BOS, x_0 .. x_{L-2}], L tokens, causal;
- a BIDIRECTIONAL row (MDLM) is z_t, L tokens, every query sees every key;
- a BLOCK_DIFFUSION row (BD3-LM, block size L') is [x_t ; x], 2L tokens: an x_t query of block b
  sees its own noisy block (bidirectionally) and the clean x blocks < b; an x query sees the x
  blocks <= its own. Block size 1 is Eso-LM (B)'s sequential mask with the identity order.
Each query attends to at most two contiguous key ranges, [start, end) and [self_start, self_end)
(the z0 query itself; a BD3-LM x_t query's own block): that one description (``row_key_ranges``)
gives the predicate ``allowed(q, k)`` (True = query q may attend to key k) shared by the dense
reference (boolean tensor for SDPA) and FlexAttention's ``mask_mod``, and FlexAttention's block
sparsity without a dense mask (esolm_dist.kernels.flex_masks).

The samplers' masks are the diffusion mask of one sequence (``diffusion_allowed``): decoded tokens
are its clean tokens, a step's masks follow in the decoding order. Eso-LM (B) and every cached
step is that mask with variant "B" (causal in the decoding order; queries after C cached rows
are the indices C, C + 1, ...); Eso-LM (A)'s recomputed steps use variant "A".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DIFFUSION_PAIR = 0
SEQUENTIAL = 1
CAUSAL = 2
BIDIRECTIONAL = 3
BLOCK_DIFFUSION = 4
DIFFUSION_KINDS = (DIFFUSION_PAIR, BIDIRECTIONAL, BLOCK_DIFFUSION)  # their loss is logged as loss_diffusion
SEQUENTIAL_KINDS = (SEQUENTIAL, CAUSAL)  # logged as loss_sequential
MODEL_KIND = {"ar": CAUSAL, "mdlm": BIDIRECTIONAL, "bd3lm": BLOCK_DIFFUSION}  # the one row kind of a baseline


def diffusion_key_end(q, n_clean, variant: str):
    """Diffusion input of one sequence (indices within it, clean tokens first): query q attends
    to the keys [0, end).

    (B): causal in sorted order, A_ij = 0 iff sigma^-1(i) >= sigma^-1(j): end = q + 1.
    (A): clean tokens attend to all clean tokens (bidirectional); masks are causal (prefix-LM):
    every query also sees the n_clean clean keys, end = max(q + 1, n_clean).
    """
    end = q + 1
    if variant == "A":
        return torch.maximum(end, n_clean)
    return end


def diffusion_allowed(q, k, n_clean, variant: str):
    """Whether query q may attend to key k (indices >= 0 in sorted order, clean tokens first) in
    the diffusion mask of one sequence: the predicate of ``diffusion_key_end``. (B) ignores n_clean."""
    return k < diffusion_key_end(q, n_clean, variant)


def sequential_key_end(q, seq_len: int, n_clean, variant: str):
    """Sequential input [z0 ; x] of length 2L: BD3-LM's block-diffusion mask with block size 1.

    z0 query i attends to itself and to x at sorted positions < i; x query L + i is causal over
    x (positions <= i). So every query sees the x keys [L, end), and z0 queries themselves too.
    (A) additionally lets every query see all clean x tokens (x-side clean tokens bidirectional).
    """
    end = torch.where(q < seq_len, q + seq_len, q + 1)  # z0: strictly earlier; x: up to itself
    if variant == "A":
        return torch.maximum(end, seq_len + n_clean)
    return end


def block_diffusion_key_ranges(q, seq_len: int, block_size: int):
    """BD3-LM's [x_t ; x] row: (start, end, self_start, self_end) of query q.

    x_t query q (q < L) of block b = q // L': the x keys of blocks < b, [L, L + b L'), and its own
    noisy block [b L', (b + 1) L'). x query L + i: the x keys of blocks <= its own.
    """
    noisy = q < seq_len
    index = torch.where(noisy, q, q - seq_len)
    block_start = index // block_size * block_size
    end = torch.where(noisy, seq_len + block_start, seq_len + block_start + block_size)
    return seq_len, end, torch.where(noisy, block_start, q), torch.where(noisy, block_start + block_size, q)


def row_key_ranges(q, kind, n_clean_first, n_clean_second, seq_len: int, variant: str, block_size: int = 1):
    """The keys query q of a row attends to: [start, end) and [self_start, self_end).

    Every mask here has this form, at most two contiguous key ranges per query; the dense mask,
    FlexAttention's ``mask_mod`` and its block sparsity are all derived from it.
    - diffusion pair: the query's own segment (offset 0 or L), range from ``diffusion_key_end``;
    - sequential: x keys [L, ``sequential_key_end``), plus itself for a z0 query;
    - causal (AR): [0, q + 1); bidirectional (MDLM): [0, L);
    - block diffusion (BD3-LM): ``block_diffusion_key_ranges``.
    """
    in_second = q >= seq_len
    offset = torch.where(in_second, seq_len, 0)
    n_clean_q = torch.where(in_second, n_clean_second, n_clean_first)
    pair_end = offset + diffusion_key_end(q - offset, n_clean_q, variant)
    sequential = kind == SEQUENTIAL
    start = torch.where(sequential, seq_len, offset)
    end = torch.where(sequential, sequential_key_end(q, seq_len, n_clean_first, variant), pair_end)
    z0_self = sequential & ~in_second
    self_start, self_end = q, torch.where(z0_self, q + 1, q)
    block_start, block_end, block_self_start, block_self_end = block_diffusion_key_ranges(q, seq_len, block_size)
    is_block = kind == BLOCK_DIFFUSION
    start = torch.where(is_block, block_start, start)
    end = torch.where(is_block, block_end, end)
    self_start = torch.where(is_block, block_self_start, self_start)
    self_end = torch.where(is_block, block_self_end, self_end)
    start = torch.where((kind == CAUSAL) | (kind == BIDIRECTIONAL), 0, start)
    end = torch.where(kind == CAUSAL, q + 1, torch.where(kind == BIDIRECTIONAL, seq_len, end))
    return start, end, self_start, self_end


def row_allowed(q, k, kind, n_clean_first, n_clean_second, seq_len: int, variant: str, block_size: int = 1):
    """The mask of one row of any kind (the predicate FlexAttention evaluates)."""
    start, end, self_start, self_end = row_key_ranges(q, kind, n_clean_first, n_clean_second, seq_len, variant,
                                                      block_size)
    return ((start <= k) & (k < end)) | ((self_start <= k) & (k < self_end))


@dataclass
class RowMaskSpec:
    """The attention masks of a batch of rows: what every attention backend must implement."""

    variant: str
    seq_len: int  # L; rows hold 2L tokens (esolm, bd3lm) or L (ar, mdlm)
    kinds: torch.Tensor  # [R] DIFFUSION_PAIR or SEQUENTIAL (esolm), else the model's one kind
    n_clean: torch.Tensor  # [R, 2] clean tokens per segment (diffusion) or [n, n] (sequential); unused otherwise
    model: str = "esolm"  # eso.model: esolm | ar | mdlm | bd3lm
    block_size: int = 1  # L' of BLOCK_DIFFUSION rows

    @property
    def row_len(self) -> int:
        return self.seq_len if self.model in ("ar", "mdlm") else 2 * self.seq_len

    @property
    def depends_on_clean_counts(self) -> bool:
        """Only Eso-LM (A)'s masks change with the clean counts (the rest depend on L and the kinds)."""
        return self.model == "esolm" and self.variant == "A"

    def dense(self, device=None) -> torch.Tensor:
        """Boolean [R, 1, 2L, 2L], True = attend (the reference every backend is checked against)."""
        device = device or self.kinds.device
        idx = torch.arange(self.row_len, device=device)
        q, k = idx.view(1, -1, 1), idx.view(1, 1, -1)
        kinds = self.kinds.to(device).view(-1, 1, 1)
        n_clean = self.n_clean.to(device)
        allowed = row_allowed(q, k, kinds, n_clean[:, 0].view(-1, 1, 1), n_clean[:, 1].view(-1, 1, 1),
                              self.seq_len, self.variant, self.block_size)
        return allowed.unsqueeze(1)

    def key_ranges(self, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """start, end, self_start, self_end [R, row_len] of every row's queries (``row_key_ranges``)."""
        device = device or self.kinds.device
        q = torch.arange(self.row_len, device=device).view(1, -1)
        n_clean = self.n_clean.to(device)
        ranges = row_key_ranges(q, self.kinds.to(device).view(-1, 1), n_clean[:, :1], n_clean[:, 1:],
                                self.seq_len, self.variant, self.block_size)
        return tuple(torch.as_tensor(r, device=device).expand(len(self.kinds), self.row_len) for r in ranges)

    def mask_mod(self):
        """FlexAttention mask_mod(b, h, q_idx, kv_idx) for the same predicate."""
        kinds, n_clean, seq_len, variant, block_size = (self.kinds, self.n_clean, self.seq_len, self.variant,
                                                        self.block_size)

        def mod(b, h, q_idx, kv_idx):
            return row_allowed(q_idx, kv_idx, kinds[b], n_clean[b, 0], n_clean[b, 1], seq_len, variant, block_size)

        return mod

    def segments_if_causal(self) -> bool:
        """True when every row is two plain causal segments of L (Eso-LM (B) diffusion rows only).

        Such rows can run on a variable-length causal kernel (flash-attn) with 2 segments per row.
        """
        return self.model == "esolm" and self.variant == "B" and bool((self.kinds == DIFFUSION_PAIR).all())

    def to(self, device) -> RowMaskSpec:
        return dataclasses.replace(self, kinds=self.kinds.to(device), n_clean=self.n_clean.to(device))
