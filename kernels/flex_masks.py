"""FlexAttention block masks of Eso-LM rows, built from each query's key range (no dense mask).

FlexAttention skips the empty (query block, key block) tiles, runs the full ones without the
``mask_mod`` and evaluates it only in the partial ones. ``create_block_mask`` finds them by
evaluating the ``mask_mod`` on all R x 2L x 2L pairs. Here each query's key ranges
(:func:`esolm_dist.eso.masks.row_key_ranges`) gives how many keys of every key block it sees,
and the sums over query blocks classify the tiles: R x 2L x 2L / block work, no dense tensor.

Eso-LM (B)'s masks in sorted order, like the baselines' (AR, MDLM, BD3-LM), depend only on L
and the row kinds, not on the clean counts: each is built once per (L, kinds, device, block size) and reused. (A)'s depend on the
clean counts and are built per batch; their ``mask_mod`` is the same code over new tensors of
the same shapes, so a compiled ``flex_attention`` is not recompiled for a new batch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from esolm_dist.eso.masks import RowMaskSpec

BLOCK_SIZE = 128  # FlexAttention's default tile


def flex_block_mask(masks: RowMaskSpec, device: torch.device, block_size: int = BLOCK_SIZE) -> BlockMask:
    """The BlockMask of these rows on ``device``: cached when the masks ignore the clean counts
    (Eso-LM (B), the baselines), built for Eso-LM (A)."""
    device = torch.device(device)
    if not masks.depends_on_clean_counts:
        return _fixed_block_mask(masks.variant, masks.seq_len, tuple(masks.kinds.tolist()), masks.model,
                                 masks.block_size, device, block_size)
    return build_block_mask(masks.to(device), block_size)


@functools.lru_cache(maxsize=32)
def _fixed_block_mask(variant: str, seq_len: int, kinds: tuple[int, ...], model: str, row_block_size: int,
                      device: torch.device, block_size: int) -> BlockMask:
    rows = len(kinds)
    masks = RowMaskSpec(variant, seq_len, torch.tensor(kinds, device=device),
                        torch.zeros(rows, 2, dtype=torch.long, device=device),  # ignored by these masks
                        model=model, block_size=row_block_size)
    return build_block_mask(masks, block_size)


def build_block_mask(masks: RowMaskSpec, block_size: int = BLOCK_SIZE) -> BlockMask:
    """The BlockMask of ``masks`` (on their device), its tiles classified from the key ranges."""
    start, end, self_start, self_end = masks.key_ranges()  # [R, S]: two disjoint ranges per query
    rows, length = start.shape
    num_blocks = -(-length // block_size)
    first_key = torch.arange(num_blocks, device=start.device) * block_size  # [n]

    def seen(low, high):  # [R, S, n]: keys of each key block inside [low, high)
        return (torch.minimum(high[..., None], first_key + block_size)
                - torch.maximum(low[..., None], first_key)).clamp_(min=0)

    keys_seen = seen(start, end) + seen(self_start, self_end)
    keys_seen = F.pad(keys_seen, (0, 0, 0, num_blocks * block_size - length))  # padded queries see nothing
    per_tile = keys_seen.view(rows, 1, num_blocks, block_size, num_blocks).sum(3)  # [R, 1, n, n]
    full = per_tile == block_size * block_size  # padding is never seen: edge tiles stay partial
    partial = (per_tile > 0) & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=block_size,
                                    mask_mod=masks.mask_mod(), seq_lengths=(length, length))


def reference_block_mask(masks: RowMaskSpec) -> BlockMask:
    """The reference: torch's ``create_block_mask``, the ``mask_mod`` evaluated on every pair."""
    return create_block_mask(masks.mask_mod(), masks.kinds.shape[0], None, masks.row_len, masks.row_len,
                             device=masks.kinds.device)


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean tiles [..., n_q, n_kv] -> per query block, the count and the indices of its key blocks."""
    tiles = tiles.to(torch.int32)
    indices = torch.argsort(tiles, dim=-1, descending=True, stable=True)
    return tiles.sum(-1, dtype=torch.int32), indices.to(torch.int32)
