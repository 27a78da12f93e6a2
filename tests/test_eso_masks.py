"""Each mask spec equals a brute-force construction from the paper's definition (section 2)."""

import pytest
import torch

from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL, RowMaskSpec
from esolm_dist.eso.orders import diffusion_order, inverse_permutation, sequential_order


def brute_diffusion(rank, clean, variant):
    """Original coordinates: (B) A_ij = 1 iff sigma^-1(i) >= sigma^-1(j); (A) also every clean j."""
    length = len(rank)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    for i in range(length):
        for j in range(length):
            allowed[i, j] = rank[i] >= rank[j] or (variant == "A" and bool(clean[j]))
    return allowed


def brute_sequential(rank, clean, variant):
    """[z0 ; x]: z0_i sees itself and x_j with sigma^-1(j) < sigma^-1(i); x_i sees x_j with <=; (A) + clean x_j."""
    length = len(rank)
    allowed = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for i in range(length):
        allowed[i, i] = True
        for j in range(length):
            extra = variant == "A" and bool(clean[j])
            allowed[i, length + j] = rank[j] < rank[i] or extra
            allowed[length + i, length + j] = rank[j] <= rank[i] or extra
    return allowed


def to_sorted(allowed, order):
    index = torch.cat([order, order + len(order)]) if allowed.shape[0] == 2 * len(order) else order
    return allowed[index][:, index]


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("seed", range(4))
def test_diffusion_mask_matches_definition(variant, seed):
    gen = torch.Generator().manual_seed(seed)
    length = 9
    is_masked = torch.rand(2, length, generator=gen) < torch.rand(2, 1, generator=gen)  # random cut-offs
    orders = diffusion_order(is_masked, gen)
    n_clean = (~is_masked).sum(-1)
    spec = RowMaskSpec(variant, length, torch.tensor([DIFFUSION_PAIR]), n_clean.view(1, 2))
    dense = spec.dense()[0, 0]
    for segment in range(2):
        rank = inverse_permutation(orders[segment])
        expected = to_sorted(brute_diffusion(rank, ~is_masked[segment], variant), orders[segment])
        block = slice(segment * length, (segment + 1) * length)
        assert torch.equal(dense[block, block], expected)
    assert not dense[:length, length:].any() and not dense[length:, :length].any()  # packed pair: no leak


@pytest.mark.parametrize("variant", ["A", "B"])
@pytest.mark.parametrize("seed", range(4))
def test_sequential_mask_matches_definition(variant, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    length = 8
    is_masked = torch.rand(length, generator=gen) < torch.rand(1, generator=gen)
    order = sequential_order(is_masked.unsqueeze(0), gen, shuffle_clean=(variant == "B"))[0]
    n_clean = int((~is_masked).sum())
    spec = RowMaskSpec(variant, length, torch.tensor([SEQUENTIAL]), torch.tensor([[n_clean, n_clean]]))
    rank = inverse_permutation(order)
    expected = to_sorted(brute_sequential(rank, ~is_masked, variant), order)
    assert torch.equal(spec.dense()[0, 0], expected)


def test_b_diffusion_mask_is_causal_in_sorted_order():
    spec = RowMaskSpec("B", 6, torch.tensor([DIFFUSION_PAIR]), torch.tensor([[3, 1]]))
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    dense = spec.dense()[0, 0]
    assert torch.equal(dense[:6, :6], causal) and torch.equal(dense[6:, 6:], causal)
    assert spec.segments_if_causal()


def test_orders_put_clean_tokens_first_and_sequential_masks_left_to_right():
    gen = torch.Generator().manual_seed(3)
    is_masked = torch.rand(4, 12, generator=gen) < 0.5
    for order in (diffusion_order(is_masked, gen), sequential_order(is_masked, gen)):
        masked_sorted = torch.gather(is_masked, 1, order)
        assert torch.equal(masked_sorted, torch.sort(masked_sorted.int(), dim=1, stable=True)[0].bool())
    seq = sequential_order(is_masked, gen)
    for row in range(4):
        tail = seq[row][torch.gather(is_masked, 1, seq)[row]]
        assert torch.equal(tail, torch.sort(tail)[0])
    assert torch.equal(inverse_permutation(seq).gather(1, seq), torch.arange(12).expand(4, 12))
