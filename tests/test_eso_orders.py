"""The law of every order (paper section 2): diffusion (clean first, both groups uniformly shuffled),
sequential (clean first; masks ascending; (A) clean unshuffled), likelihood (a Binomial(L, alpha0)
subset in random order, then the rest ascending). Expected laws are enumerated from the definitions."""

import itertools
import math

import torch

from esolm_dist.eso.likelihood import likelihood_order
from esolm_dist.eso.orders import diffusion_order, inverse_permutation, sequential_order

IS_MASKED = torch.tensor([False, True, False, True, True, False])  # clean {0, 2, 5}, masked {1, 3, 4}
CLEAN, MASKED = [0, 2, 5], [1, 3, 4]
DRAWS = 6000


def slot_frequencies(orders, slots, members):
    """freq[i][j]: how often slot slots[i] of the order holds members[j]."""
    return torch.tensor([[(orders[:, s] == m).double().mean().item() for m in members] for s in slots])


# each of 3 members in each of 3 slots w.p. 1/3: sd sqrt((1/3)(2/3) / 6000) = 0.0061 -> 5 sigma = 0.030;
# an unshuffled group puts 1 or 0 in every cell, 0.67 away
UNIFORM_TOL = 0.030


def test_diffusion_order_clean_first_each_group_uniformly_shuffled():
    """Catches masks first (clean-first swapped), clean tokens or masks left in natural order, and
    an order that mixes the two groups."""
    orders = diffusion_order(IS_MASKED.expand(DRAWS, -1), torch.Generator().manual_seed(0))
    assert torch.equal(orders[:, :3].sort(dim=1).values, torch.tensor(CLEAN).expand(DRAWS, -1))
    assert torch.equal(orders[:, 3:].sort(dim=1).values, torch.tensor(MASKED).expand(DRAWS, -1))
    assert (slot_frequencies(orders, [0, 1, 2], CLEAN) - 1 / 3).abs().max() < UNIFORM_TOL
    assert (slot_frequencies(orders, [3, 4, 5], MASKED) - 1 / 3).abs().max() < UNIFORM_TOL


def test_sequential_order_b_shuffles_clean_then_masks_ascending():
    """Catches masks descending or shuffled, clean tokens not shuffled in (B), masks before clean."""
    orders = sequential_order(IS_MASKED.expand(DRAWS, -1), torch.Generator().manual_seed(1))
    assert torch.equal(orders[:, 3:], torch.tensor(MASKED).expand(DRAWS, -1))  # exactly left to right
    assert torch.equal(orders[:, :3].sort(dim=1).values, torch.tensor(CLEAN).expand(DRAWS, -1))
    assert (slot_frequencies(orders, [0, 1, 2], CLEAN) - 1 / 3).abs().max() < UNIFORM_TOL


def test_sequential_order_a_keeps_clean_tokens_unshuffled():
    """Catches Eso-LM (A) shuffling its clean tokens (its x-side clean block is read unshuffled)."""
    orders = sequential_order(IS_MASKED.expand(50, -1), torch.Generator().manual_seed(2), shuffle_clean=False)
    assert torch.equal(orders, torch.tensor(CLEAN + MASKED).expand(50, -1))


def test_inverse_permutation_hand_example():
    """Catches an inverse that returns the permutation itself: sigma = (2, 0, 3, 1) -> rank (1, 3, 0, 2)."""
    assert inverse_permutation(torch.tensor([[2, 0, 3, 1]])).tolist() == [[1, 3, 0, 2]]


def likelihood_order_law(length, alpha0):
    """P(order) by enumeration: subset S w.p. a^|S| (1-a)^(L-|S|), each of its |S|! orders equally
    likely, then the positions outside S ascending."""
    law = {}
    for size in range(length + 1):
        for subset in itertools.combinations(range(length), size):
            p_subset = alpha0 ** size * (1 - alpha0) ** (length - size) / math.factorial(size)
            rest = [i for i in range(length) if i not in subset]
            for first in itertools.permutations(subset):
                order = tuple(first) + tuple(rest)
                law[order] = law.get(order, 0.0) + p_subset
    return law


def test_likelihood_order_law_is_a_binomial_subset_then_ascending():
    """Catches a subset of fixed size round(L alpha0), a subset drawn with 1 - alpha0, the subset
    kept in ascending order, the rest shuffled or descending (the law over all 24 orders of L = 4)."""
    length, alpha0, draws = 4, 0.25, 20000
    law = likelihood_order_law(length, alpha0)
    assert abs(sum(law.values()) - 1) < 1e-12
    # hand check of one cell: (0,1,2,3) comes from S = {}, {0}, {0,1} in order, {0,1,2} in order,
    # {0,1,2,3} in order: .75^4 + .25 .75^3 + .25^2 .75^2 / 2 + .25^3 .75 / 6 + .25^4 / 24
    assert abs(law[(0, 1, 2, 3)] - (0.31640625 + 0.10546875 + 0.017578125 + 0.001953125 + 0.00016276)) < 1e-7
    gen = torch.Generator().manual_seed(3)
    counts = {}
    for _ in range(draws):
        order = tuple(likelihood_order(length, alpha0, gen).tolist())
        counts[order] = counts.get(order, 0) + 1
    assert set(counts) <= set(law)
    for order, p in law.items():
        # binomial cell count: sd sqrt(p (1-p) / 20000) <= 0.0035; 5 sigma, plus 1e-3 for p ~ 0
        tolerance = 5 * math.sqrt(p * (1 - p) / draws) + 1e-3
        assert abs(counts.get(order, 0) / draws - p) < tolerance, (order, counts.get(order, 0) / draws, p)
