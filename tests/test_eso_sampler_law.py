"""The sampler's laws (paper Alg. 2 + 3) against closed forms: the number of diffusion tokens is
Binomial(L, alpha0), the diffusion positions a uniform random subset in random order, the number of
non-empty diffusion steps that of L alpha0 tokens hitting T uniform steps; the mask token and padded
ids are never sampled; the top-p nucleus is the smallest set of most likely ids reaching top_p.
(Cached == uncached and the ascending sequential tail are in test_sampling.py.)"""

import math

import pytest
import torch

from esolm_dist.eso import METHODS, sampling
from esolm_dist.inference.export_io import ExportConfig
from esolm_dist.inference.model import EsoLM

L, ALPHA0, T, DRAWS = 16, 0.3, 3, 4000
PMF = [math.comb(L, k) * ALPHA0 ** k * (1 - ALPHA0) ** (L - k) for k in range(L + 1)]


@pytest.fixture(scope="module")
def schedules():
    gen = torch.Generator().manual_seed(0)
    return [sampling.first_hitting_schedule(1, L, ALPHA0, T, gen) for _ in range(DRAWS)]


def diffusion_tokens(schedule):
    return sum(schedule.step_sizes[:schedule.num_diffusion_steps])


def test_number_of_diffusion_tokens_is_binomial(schedules):
    """Catches a fixed count round(L alpha0) = 5, Binomial(L, 1 - alpha0), Binomial(L - 1, alpha0),
    one sequential token too many or too few (the whole pmf over 4000 schedules)."""
    counts = torch.bincount(torch.tensor([diffusion_tokens(s) for s in schedules]), minlength=L + 1).double()
    freq = counts / DRAWS
    for k, p in enumerate(PMF):
        # cell k: sd sqrt(p (1 - p) / 4000) <= 0.0072; 5 sigma (+ 1e-3 for p ~ 0)
        assert abs(freq[k].item() - p) < 5 * math.sqrt(p * (1 - p) / DRAWS) + 1e-3, (k, freq[k].item(), p)
    # mean L alpha0 = 4.8, sd of the mean sqrt(16 * 0.21 / 4000) = 0.029 -> 5 sigma = 0.15
    assert abs((freq * torch.arange(L + 1)).sum().item() - 4.8) < 0.15


def test_number_of_diffusion_steps_is_that_of_uniform_hitting_steps(schedules):
    """Catches hitting steps drawn from T - 1 (or T + 1) steps, empty steps kept, all diffusion tokens
    in one step: given n tokens, E[non-empty steps] = T (1 - (1 - 1/T)^n)."""
    expected = sum(p * T * (1 - (1 - 1 / T) ** k) for k, p in enumerate(PMF))  # 2.4441 for T = 3
    steps = torch.tensor([float(s.num_diffusion_steps) for s in schedules])
    assert all(min(s.step_sizes, default=1) >= 1 for s in schedules)
    # sd of the mean: steps' sd (0.65 measured) / sqrt(4000) = 0.010 -> 8 sigma = 0.08; drawing the
    # hitting steps from T - 1 = 2 steps gives 1.851, from T + 1 = 4 gives 2.851
    assert abs(steps.mean().item() - expected) < 0.08, (steps.mean().item(), expected)


def test_diffusion_positions_are_a_uniform_random_subset_in_random_order():
    """Catches diffusion positions taken left to right (the first n), or the subset sorted before it is
    partitioned into steps: each position is first decoded, and decoded by diffusion, equally often."""
    batch = DRAWS
    schedule = sampling.first_hitting_schedule(batch, L, 0.5, T, torch.Generator().manual_seed(1))
    n = diffusion_tokens(schedule)
    assert 2 <= n <= L - 2
    included = torch.zeros(L)
    included.scatter_add_(0, schedule.order[:, :n].flatten(), torch.ones(batch * n))
    # each position is among the n diffusion ones w.p. n / L: sd sqrt(p (1 - p) / 4000) <= 0.0079
    p = n / L
    assert (included / batch - p).abs().max().item() < 5 * math.sqrt(p * (1 - p) / batch)
    first = torch.bincount(schedule.order[:, 0], minlength=L).double() / batch
    # the first decoded position is uniform over 16: sd sqrt((1/16)(15/16) / 4000) = 0.0038 -> 5 sigma 0.019
    assert (first - 1 / L).abs().max().item() < 0.019


def tiny_model(bias_mask_and_padding, kind="esolm"):
    """A 1-layer export-layout model: tokenizer ids 0..9, [MASK] = 1, padded ids 10, 11. The head bias
    gives the mask and padded ids +50, so sampling them would be near-certain if they were allowed."""
    config = {"format": "esolm-export-v1", "vocab_size": 12, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
              "ffn_hidden_size": 32, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
              "eos_token_id": 0, "max_seq_len": 16, "variant": "B", "alpha0": 0.5, "dtype": "float32", "model": kind,
              "block_size": 4 if kind == "bd3lm" else 1}
    torch.manual_seed(0)
    model = EsoLM(ExportConfig.from_dict(config, "test config"), 10).eval()
    if bias_mask_and_padding:
        with torch.no_grad():
            model.head.bias[[1, 10, 11]] += 50.0
    return model


@pytest.mark.parametrize("method,variant", [("eso", "B"), ("eso", "A"), ("mdlm", "B"), ("ar", "B"), ("bd3lm", "B")])
def test_mask_and_padded_ids_are_never_sampled(method, variant):
    """Catches the mask token (or the padding ids) left sampleable: their logits are +50 above the
    rest here, so a single allowed draw would almost surely pick one."""
    model = tiny_model(bias_mask_and_padding=True, kind=METHODS[method])
    result = sampling.sample(model, 4, 12, method=method, variant=variant, alpha0=0.5, num_steps=4,
                             generator=torch.Generator().manual_seed(2))
    assert result.tokens.shape == (4, 12)
    assert not (result.tokens == 1).any() and result.tokens.max() < 10


# one constructed distribution, the ids in a different order on each of the two rows:
# probabilities 0.5, 0.25, 0.15, 0.1 on ids (0, 1, 2, 3) (row 0) and on ids (3, 0, 2, 1) (row 1)
RANKED_IDS = [[0, 1, 2, 3], [3, 0, 2, 1]]
PROBS = [0.5, 0.25, 0.15, 0.1]


@pytest.mark.parametrize("top_p,size", [
    (0.45, 1),   # 0.5 >= 0.45
    (0.55, 2),   # 0.5 < 0.55 <= 0.75
    (0.74, 2),   # 0.75 >= 0.74
    (0.76, 3),   # 0.75 < 0.76 <= 0.9
    (0.95, 4),   # 0.9 < 0.95
    (1.0, 4),
])
def test_nucleus_is_the_smallest_top_set_reaching_top_p(top_p, size):
    """Catches a nucleus one token too large or too small (e.g. cumulative mass including the token
    itself, or > in place of >=), a nucleus chosen over the wrong axis (ids of the other row), and a
    sampler that does not draw in proportion to the probabilities renormalised on the nucleus."""
    logits = torch.full((2, 4), 0.0)
    for row, ids in enumerate(RANKED_IDS):
        logits[row, ids] = torch.tensor(PROBS).log()
    draws = 4000
    tokens = sampling.nucleus_gumbel_sample(logits.expand(draws, 2, 4), top_p, torch.Generator().manual_seed(3))
    for row, ids in enumerate(RANKED_IDS):
        counts = torch.bincount(tokens[:, row], minlength=4).double() / draws
        nucleus = torch.tensor(PROBS[:size])
        expected = torch.zeros(4)
        expected[ids[:size]] = (nucleus / nucleus.sum()).float()
        assert set(tokens[:, row].unique().tolist()) == set(ids[:size])
        # each frequency: sd <= sqrt(0.25 / 4000) = 0.0079 -> 5 sigma = 0.04
        assert (counts.float() - expected).abs().max().item() < 0.04, (row, counts, expected)


def test_gumbel_noise_is_drawn_in_float64():
    """Catches float32 Gumbel noise (the paper's code draws float64: float32 uniforms cap the Gumbel
    tails, which shifts generative perplexity). With equal logits, Gumbel-max picks the largest uniform
    (-log(-log u) increases with u), so the draws must be the argmax of the generator's float64 stream."""
    shape = (64, 50)
    tokens = sampling.nucleus_gumbel_sample(torch.zeros(shape), 1.0, torch.Generator().manual_seed(5))
    uniforms = torch.rand(shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert torch.equal(tokens, uniforms.argmax(dim=-1))
    float32_uniforms = torch.rand(shape, generator=torch.Generator().manual_seed(5))
    assert not torch.equal(tokens, float32_uniforms.argmax(dim=-1))  # the test can tell the two apart
