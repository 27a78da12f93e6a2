"""Exact likelihood (paper section 2; Theorem 3.1) with a hand-made "left-neighbour" model whose
conditionals are known, so log p_sigma(x), the IW bound and its law over orders are computed by hand
or by enumeration, never by the functions under test.

The model reads only what the sequential mask lets a z0 query see on the x half:
- it sees its own clean token (a leak): 0.99 on it;
- else it sees its left neighbour's clean token v: 0.9 on v + 1 (mod 4), 0.1 / 3 on each other token;
- else: uniform 1/4 over the 4 real tokens. The mask token (id 4) gets logit -inf.
With x = (0, 1, 2) every "v + 1" guess is right, so p(x_l | seen) is 0.9 if l - 1 comes before l in
sigma, else 1/4.
"""

import itertools
import math

import torch

from esolm_dist.eso import likelihood
from esolm_dist.eso.likelihood import importance_weighted_nll, order_log_likelihood

MASK_ID, REAL = 4, 4
X = torch.tensor([0, 1, 2])
P_NATURAL = 0.25 * 0.9 * 0.9  # sigma = (0, 1, 2): 1/4 (no left neighbour), then 0.9, 0.9 = 0.2025
P_REVERSED = 0.25 ** 3  # sigma = (2, 1, 0): no left neighbour is ever seen first = 1/64


def left_neighbour_logits(tokens, positions, masks):
    rows, width = tokens.shape
    length = width // 2
    seen = masks.dense(tokens.device)[:, 0, :, length:]  # [R, 2L queries, L x-half keys]
    key_pos, key_tok = positions[:, None, length:], tokens[:, None, length:]
    query_pos = positions[:, :, None]
    own = seen & (key_pos == query_pos)
    left = seen & (key_pos == query_pos - 1)
    probs = torch.full((rows, width, REAL), 1 / REAL, dtype=torch.float64)
    guess = ((left * key_tok).sum(-1) + 1) % REAL
    guessed = torch.full_like(probs, 0.1 / 3).scatter(-1, guess.unsqueeze(-1), 0.9)
    probs = torch.where(left.any(-1, keepdim=True), guessed, probs)
    cheat = torch.full_like(probs, 0.01 / 3).scatter(-1, (own * key_tok).sum(-1, keepdim=True), 0.99)
    probs = torch.where(own.any(-1, keepdim=True), cheat, probs)
    logits = torch.cat([probs.log(), torch.full((rows, width, 1), float("-inf"), dtype=torch.float64)], -1)
    return logits.float()


def p_order(order):
    """p_sigma(x) from the model's definition: 0.9 when l - 1 precedes l in sigma, else 1/4."""
    rank = {pos: i for i, pos in enumerate(order)}
    return math.prod(0.9 if pos > 0 and rank[pos - 1] < rank[pos] else 0.25 for pos in order)


def test_order_log_likelihood_hand_values():
    """Catches the x half fed unsorted or at sorted positions, a z0 query that sees its own token
    (0.99 instead of the true conditional), a z0 half that is not all masks, an off-by-one in what
    a query sees (a left neighbour missed), and a dropped or extra factor."""
    x = X.expand(3, -1)
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    got = order_log_likelihood(left_neighbour_logits, x, orders, MASK_ID).double()
    # (1, 0, 2): 1/4 (0 unseen), 1/4 (0 has no left), 0.9 (1 seen before 2) = 0.05625
    expected = torch.tensor([P_NATURAL, P_REVERSED, 0.25 * 0.25 * 0.9], dtype=torch.float64).log()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_iw_bound_of_identical_orders_is_the_one_order_value(monkeypatch):
    """Catches log K with the wrong sign or missing (K identical orders must give -log p_sigma(x),
    for K = 1 and K > 1: with the sign flipped K = 4 would add 2 log 4 = 2.77)."""
    x = X.expand(2, -1)
    gen = torch.Generator().manual_seed(0)
    # alpha0 = 0: the empty subset, then ascending: every order is (0, 1, 2)
    for k in (1, 4):
        got = importance_weighted_nll(left_neighbour_logits, x, k, 0.0, MASK_ID, gen).double()
        torch.testing.assert_close(got, torch.full((2,), -math.log(P_NATURAL), dtype=torch.float64),
                                   rtol=0, atol=1e-5)  # -log 0.2025 = 1.5970
    monkeypatch.setattr(likelihood, "likelihood_order", lambda length, alpha0, generator: torch.tensor([2, 1, 0]))
    got = importance_weighted_nll(left_neighbour_logits, x, 3, 0.5, MASK_ID, gen).double()
    torch.testing.assert_close(got, torch.full((2,), 3 * math.log(4), dtype=torch.float64), rtol=0, atol=1e-5)


def test_iw_bound_of_two_fixed_orders_is_the_log_mean_exp(monkeypatch):
    """Catches log-sum-exp without the 1/K, a mean of log p (no importance weighting), a max, the
    sign of log K flipped."""
    scripted = itertools.cycle([torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])])
    monkeypatch.setattr(likelihood, "likelihood_order", lambda length, alpha0, generator: next(scripted))
    got = importance_weighted_nll(left_neighbour_logits, X[None], 2, 0.5, MASK_ID, torch.Generator()).item()
    # -log((0.2025 + 0.015625) / 2) = -log(0.1090625) = 2.2158342
    assert abs(got - 2.2158342) < 1e-5
    # the mean of -log p would be (1.5970 + 4.1589) / 2 = 2.8779; the log-sum-exp without 1/K 1.5227


def likelihood_order_law(length, alpha0):
    """P(order) of the paper's likelihood orders, by enumeration (see test_eso_orders.py)."""
    law = {}
    for size in range(length + 1):
        for subset in itertools.combinations(range(length), size):
            p_subset = alpha0 ** size * (1 - alpha0) ** (length - size) / math.factorial(size)
            rest = tuple(i for i in range(length) if i not in subset)
            for first in itertools.permutations(subset):
                law[first + rest] = law.get(first + rest, 0.0) + p_subset
    return law


def compositions(total, parts):
    """All tuples of `parts` non-negative ints summing to `total`."""
    if parts == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in compositions(total - first, parts - 1):
            yield (first,) + rest


def exact_expected_bound(k, alpha0):
    """E over K i.i.d. orders of -log((1/K) sum_k p_sigma_k(x)): enumerate how many of the K orders
    are each possible order (multinomial law over the 6 orders of L = 3)."""
    law = list(likelihood_order_law(3, alpha0).items())
    total = 0.0
    for counts in compositions(k, len(law)):
        weight = math.factorial(k) * math.prod(p ** c / math.factorial(c) for (_, p), c in zip(law, counts, strict=True))
        mean_p = sum(c * p_order(order) for (order, _), c in zip(law, counts, strict=True)) / k
        total += weight * -math.log(mean_p)
    return total


def test_iw_bound_matches_its_exact_law_and_decreases_in_k():
    """Catches a bound that does not decrease in K (log K sign flipped: + 2 log K), orders drawn
    from the wrong law (fixed-size subset, rest shuffled), all sequences of a batch sharing orders
    (the batch would then not average over orders: its spread collapses), and a wrong average."""
    alpha0, batch = 0.5, 3000
    exact = {k: exact_expected_bound(k, alpha0) for k in (1, 2, 8)}
    # Theorem 3.1: E[L^K] is non-increasing in K, towards -log E_sigma p_sigma(x) = 2.2866 here:
    # K = 1, 2, 8 give 2.5577, 2.4274, 2.3198
    assert exact[1] > exact[2] + 0.1 and exact[2] > exact[8] + 0.1, exact
    x = X.expand(batch, -1)
    gen = torch.Generator().manual_seed(5)
    means, sds = {}, {}
    for k, want in exact.items():
        values = importance_weighted_nll(left_neighbour_logits, x, k, alpha0, MASK_ID, gen).double()
        assert values.std().item() > 0.1, "every sequence must draw its own orders"
        # each sequence draws its own K orders: the batch mean has sd = std / sqrt(3000), measured
        # 0.014, 0.010, 0.005 for K = 1, 2, 8; 5 sigma <= 0.07 catches the + 2 log 2 = 1.39 of a
        # flipped sign and a wrong order law (e.g. alpha0 = 0.25 orders give 2.157 at K = 1)
        means[k], sds[k] = values.mean().item(), values.std().item() / math.sqrt(batch)
        assert abs(means[k] - want) < 5 * sds[k], (k, means[k], want, sds[k])
    # on average over the orders' seeds the bound decreases in K: both gaps (0.13, 0.11) are > 6
    # sd of the difference (0.017, 0.011), so these cannot fail by chance
    assert means[1] > means[2] > means[8], means
