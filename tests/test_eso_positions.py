"""Rotary embeddings at ORIGINAL positions (design.md "The block"; paper section 2: sorting permutes
rotary cos/sin by the same sort_idx), in both halves of a sequential row, and the network's no-leak
property on packed diffusion rows."""

import math

import pytest
import torch
from conftest import MASK_ID, random_tokens

from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL, RowMaskSpec
from esolm_dist.eso.rows import build_rows
from esolm_dist.model.rotary import apply_rotary, rotary_tables

L = 8


def test_rotary_tables_closed_form():
    """Catches a wrong frequency (base^(-i/d) instead of base^(-2i/d)), positions replaced by their
    index, cos and sin swapped: head_dim 4, base 10000 -> frequencies 1 and 10000^(-1/2) = 0.01."""
    cos, sin = rotary_tables(torch.tensor([[0, 3, 7]]), 4, 10000.0)
    angles = torch.tensor([[0.0, 0.0], [3.0, 0.03], [7.0, 0.07]])
    assert cos.shape == (1, 1, 3, 2)
    torch.testing.assert_close(cos[0, 0], angles.cos(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin[0, 0], angles.sin(), rtol=0, atol=1e-6)


def test_apply_rotary_rotates_non_interleaved_halves():
    """Catches interleaved pairs (x0, x1) in place of halves (x0, x2), and a rotation the wrong way:
    at position 3, e0 -> (cos 3, 0, sin 3, 0), e2 -> (-sin 3, 0, cos 3, 0), e1 -> (0, cos .03, 0, sin .03)."""
    cos, sin = rotary_tables(torch.tensor([[3]]), 4, 10000.0)
    basis = torch.eye(4).view(4, 1, 1, 4)  # [R=4, H=1, S=1, D=4]
    out = apply_rotary(basis, cos, sin)[:, 0, 0]
    c, s, c2, s2 = math.cos(3), math.sin(3), math.cos(0.03), math.sin(0.03)
    expected = torch.tensor([[c, 0, s, 0], [0, c2, 0, s2], [-s, 0, c, 0], [0, -s2, 0, c2]])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", ["A", "B"])
def test_rows_carry_each_tokens_original_position_in_both_halves(variant):
    """Catches rows whose positions are the sorted index (0..L-1), a sequential row whose two halves
    carry different positions, and tokens / targets not gathered by the same order."""
    x = random_tokens(6, L, seed=3)
    r = build_rows(x, alpha0=0.5, kappa=2 / 3, variant=variant, loss_type="elbo", eps=1e-3, mask_id=MASK_ID,
                   generator=torch.Generator().manual_seed(4))
    segments = [(0, 0), (0, 1), (1, 0), (1, 1)]  # 4 diffusion sequences in 2 pair rows
    for seq, (row, seg) in enumerate(segments):
        part = slice(seg * L, (seg + 1) * L)
        pos, tok = r.positions[row, part], r.tokens[row, part]
        assert sorted(pos.tolist()) == list(range(L))
        assert ((tok == x[seq, pos]) | (tok == MASK_ID)).all()
        assert torch.equal(r.targets[row, part], x[seq, pos])
    for seq, row in ((4, 2), (5, 3)):
        pos = r.positions[row]
        assert torch.equal(pos[:L], pos[L:]) and sorted(pos[:L].tolist()) == list(range(L))
        assert torch.equal(r.tokens[row, L:], x[seq, pos[L:]])  # x half: the clean token of that position
        z0 = r.tokens[row, :L]
        assert ((z0 == x[seq, pos[:L]]) | (z0 == MASK_ID)).all()
        assert (z0 == MASK_ID).any() and (z0 != MASK_ID).any()  # the order is not the identity here
        assert not torch.equal(pos[:L], torch.arange(L))


@pytest.fixture()
def sensitive_network(tiny_network):
    """The tiny network with weights large enough that positions and context move the logits by O(1)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in tiny_network.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[1]))
            else:
                param.add_(0.2 * torch.randn_like(param))
    return tiny_network


def back_to_original(out, order):
    """Outputs in processing order [S, V] -> original order."""
    result = torch.empty_like(out)
    result[order] = out
    return result


@torch.no_grad()
def test_network_applies_rotary_at_the_given_positions(sensitive_network):
    """With every token clean, (A) lets every token of a diffusion segment see every other one, so
    the network must be equivariant: processing x in two orders (positions travelling with the
    tokens) gives the same logits per original position. Catches rotary at the sorted index."""
    x = random_tokens(1, L, seed=5)[0]
    first, second = torch.randperm(L, generator=torch.Generator().manual_seed(6)), torch.arange(L).flip(0)
    tokens = torch.cat([x[first], x[second]])[None]
    masks = RowMaskSpec("A", L, torch.tensor([DIFFUSION_PAIR]), torch.tensor([[L, L]]))

    def per_position(positions):
        out = sensitive_network(tokens, positions[None], masks)[0].float()
        return back_to_original(out[:L], first), back_to_original(out[L:], second)

    a, b = per_position(torch.cat([first, second]))
    torch.testing.assert_close(a[:, :MASK_ID], b[:, :MASK_ID], rtol=0, atol=1e-4)
    # the test can fail: at the sorted index (what a sort without permuted rotary would do) they differ
    a, b = per_position(torch.arange(2 * L) % L)
    assert (a[:, :MASK_ID] - b[:, :MASK_ID]).abs().max() > 0.1


@torch.no_grad()
def test_sequential_row_uses_original_positions_in_both_halves(sensitive_network):
    """A (B) sequential row [z0 ; x] with positions [sigma ; sigma]. (1) Swapping two clean tokens in
    sigma leaves every mask's visible set of (token, position) pairs unchanged, so with ONE block
    (deeper, the x half's causal prefixes differ) the masks' logits must not move (catches the x
    half at sorted positions). (2) Shifting every original position by 5 must not move any logit
    (rotary is relative; catches the z0 half at sorted positions while x is at original ones)."""
    sensitive_network.blocks = sensitive_network.blocks[:1]
    x = random_tokens(1, L, seed=7)[0]
    is_masked = torch.tensor([False, True, False, True, True, False, True, False])
    clean, masked = [0, 2, 5, 7], [1, 3, 4, 6]
    orders = [torch.tensor(clean + masked), torch.tensor([2, 0, 5, 7] + masked)]
    n = len(clean)
    masks = RowMaskSpec("B", L, torch.tensor([SEQUENTIAL, SEQUENTIAL]), torch.tensor([[n, n], [n, n]]))
    z0 = torch.where(is_masked, torch.full_like(x, MASK_ID), x)
    tokens = torch.stack([torch.cat([z0[o], x[o]]) for o in orders])
    positions = torch.stack([torch.cat([o, o]) for o in orders])
    out = sensitive_network(tokens, positions, masks).float()[..., :MASK_ID]
    torch.testing.assert_close(out[0, n:L], out[1, n:L], rtol=0, atol=1e-4)  # the 4 masks' predictions
    shifted = sensitive_network(tokens, positions + 5, masks).float()[..., :MASK_ID]
    torch.testing.assert_close(shifted, out, rtol=0, atol=1e-4)
    # the test can fail: the z0 half at its sorted index moves the masks' logits
    wrong = positions.clone()
    wrong[:, :L] = torch.arange(L)
    assert (sensitive_network(tokens, wrong, masks).float()[0, n:L, :MASK_ID] - out[0, n:L]).abs().max() > 0.1


@torch.no_grad()
def test_packed_diffusion_rows_do_not_leak(sensitive_network):
    """A diffusion pair row holds two independent sequences, causal in sorted order for (B): catches
    attention across the two segments and to later tokens of the same segment."""
    tokens = random_tokens(1, 2 * L, seed=8)
    positions = torch.cat([torch.randperm(L, generator=torch.Generator().manual_seed(9)), torch.arange(L)])[None]
    masks = RowMaskSpec("B", L, torch.tensor([DIFFUSION_PAIR]), torch.tensor([[3, 5]]))
    base = sensitive_network(tokens, positions, masks)
    other_segment = tokens.clone()
    other_segment[0, L:] = (other_segment[0, L:] + 1) % MASK_ID
    torch.testing.assert_close(sensitive_network(other_segment, positions, masks)[0, :L], base[0, :L],
                               rtol=0, atol=1e-6)
    later = tokens.clone()
    later[0, 5:L] = (later[0, 5:L] + 1) % MASK_ID  # sorted slots 5..7 of the first segment
    changed = sensitive_network(later, positions, masks)
    torch.testing.assert_close(changed[0, :5], base[0, :5], rtol=0, atol=1e-6)
    assert (changed[0, 5:L, :MASK_ID] - base[0, 5:L, :MASK_ID]).abs().max() > 0.1  # the test can fail
