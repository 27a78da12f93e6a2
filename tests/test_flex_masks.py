"""FlexAttention block masks from key ranges (esolm_dist.kernels.flex_masks): what FlexAttention
computes with them is the paper's mask, their tiles are torch's, (B)'s are built once per shape,
and a compiled flex_attention is not recompiled for a new batch of (A)."""

import pytest
import torch
from conftest import MASK_ID, random_tokens
from test_eso_masks import brute_diffusion, brute_sequential, to_sorted
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from esolm_dist.eso.masks import DIFFUSION_PAIR
from esolm_dist.eso.orders import inverse_permutation
from esolm_dist.eso.rows import build_rows
from esolm_dist.kernels.flex_masks import build_block_mask, flex_block_mask

CPU = torch.device("cpu")


def batch_rows(variant, length, alpha0, kappa, seed):
    x = random_tokens(8, length, seed=seed)
    return build_rows(x, alpha0=alpha0, kappa=kappa, variant=variant, loss_type="elbo", eps=1e-3, mask_id=MASK_ID,
                      generator=torch.Generator().manual_seed(seed))


def paper_mask(rows, variant):
    """Each row's mask from the definitions in original coordinates (test_eso_masks), sorted."""
    length = rows.masks.seq_len
    expected = torch.zeros(len(rows.tokens), 2 * length, 2 * length, dtype=torch.bool)
    for r, kind in enumerate(rows.masks.kinds.tolist()):
        segments = (0, length) if kind == DIFFUSION_PAIR else (0,)
        for start in segments:
            segment = slice(start, start + length)
            order = rows.positions[r, segment]
            clean = torch.zeros(length, dtype=torch.bool).scatter(0, order, rows.tokens[r, segment] != MASK_ID)
            rank = inverse_permutation(order)
            if kind == DIFFUSION_PAIR:
                expected[r, segment, segment] = to_sorted(brute_diffusion(rank, clean, variant), order)
            else:
                expected[r] = to_sorted(brute_sequential(rank, clean, variant), order)
    return expected


def tiles(num_blocks, indices):
    """Ordered (count, indices) per query block -> boolean tiles [R, H, n_q, n_kv]."""
    used = torch.arange(indices.shape[-1]) < num_blocks[..., None]
    return torch.zeros(indices.shape, dtype=torch.bool).scatter(-1, indices.long(), used)


def computed_mask(block_mask, rows, length):
    """What FlexAttention attends to: all of a full tile, the mask_mod's choice in a partial one."""
    size = block_mask.BLOCK_SIZE[0]

    def elements(t):
        return t.repeat_interleave(size, -2).repeat_interleave(size, -1)[:, 0, :length, :length]

    full = elements(tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices))
    partial = elements(tiles(block_mask.kv_num_blocks, block_mask.kv_indices))
    assert not (full & partial).any()
    chosen = create_mask(block_mask.mask_mod, rows, 1, length, length, device="cpu")[:, 0]
    return full | (partial & chosen)


CASES = [(variant, alpha0, kappa) for variant in ("A", "B")
         for alpha0, kappa in ((0.4, 0.5), (0.0, 0.5), (1.0, 0.5), (1.0, 1.0), (0.3, 0.0))]


@pytest.mark.parametrize("variant,alpha0,kappa", CASES)
@pytest.mark.parametrize("length,block_size", [(10, 2), (16, 4), (10, 8), (16, 128)])
def test_block_mask_computes_the_papers_mask(variant, alpha0, kappa, length, block_size):
    """All row kinds, clean counts from 0 to L, tiles that divide 2L or not (edge tiles padded)."""
    rows = batch_rows(variant, length, alpha0, kappa, seed=length + block_size)
    block_mask = flex_block_mask(rows.masks, CPU, block_size)
    computed = computed_mask(block_mask, len(rows.tokens), 2 * length)
    assert torch.equal(computed, paper_mask(rows, variant))


@pytest.mark.parametrize("variant,alpha0,kappa", CASES)
def test_tiles_equal_torch_create_block_mask(variant, alpha0, kappa):
    rows = batch_rows(variant, 18, alpha0, kappa, seed=3)  # 2L = 36: edge tiles padded
    masks = rows.masks
    ours = build_block_mask(masks, 8)
    reference = create_block_mask(masks.mask_mod(), len(rows.tokens), None, masks.row_len, masks.row_len,
                                  device="cpu", BLOCK_SIZE=8)
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices"),
                            ("q_num_blocks", "q_indices"), ("full_q_num_blocks", "full_q_indices")):
        assert torch.equal(getattr(ours, counts), getattr(reference, counts)), counts
        assert torch.equal(tiles(getattr(ours, counts), getattr(ours, indices)),
                           tiles(getattr(reference, counts), getattr(reference, indices))), indices
    assert (ours.kv_num_blocks > 0).any()


def test_b_block_masks_are_built_once_per_shape():
    first = batch_rows("B", 16, 0.4, 0.5, seed=0).masks
    again = batch_rows("B", 16, 0.4, 0.5, seed=1).masks  # new noise: other clean counts, same kinds
    assert not torch.equal(first.n_clean, again.n_clean) and torch.equal(first.kinds, again.kinds)
    mask = flex_block_mask(first, CPU, 8)
    assert flex_block_mask(again, CPU, 8) is mask
    assert flex_block_mask(batch_rows("B", 12, 0.4, 0.5, seed=0).masks, CPU, 8) is not mask  # another L
    assert flex_block_mask(batch_rows("B", 16, 0.4, 1.0, seed=0).masks, CPU, 8) is not mask  # other kinds
    assert flex_block_mask(first, CPU, 4) is not mask  # another tile size
    a_masks = batch_rows("A", 16, 0.4, 0.5, seed=0).masks
    assert flex_block_mask(a_masks, CPU, 8) is not flex_block_mask(a_masks, CPU, 8)  # (A): per batch


def test_compiled_flex_attention_is_not_recompiled_for_new_batches():
    """(A)'s block mask is new every batch; its mask_mod is the same code over same-shape tensors."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")  # dynamo's guards without a code generator
    compiled = torch.compile(flex_attention, backend=counter, dynamic=False)
    generator = torch.Generator().manual_seed(0)
    for seed in range(3):
        masks = batch_rows("A", 16, 0.5, 0.5, seed=seed).masks
        q, k, v = (torch.randn(len(masks.kinds), 2, masks.row_len, 8, generator=generator) for _ in range(3))
        out = compiled(q, k, v, block_mask=flex_block_mask(masks, CPU))
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=masks.dense())
        torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    assert counter.frame_count == 1
