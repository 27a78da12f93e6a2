"""batch_split (paper section 1): which sequences get which loss, how each half is normalised, and
the noise each half draws; expectations are written by hand or counted from the paper's definition."""

import pytest
import torch

from esolm_dist.config import EsoConfig
from esolm_dist.eso import schedule
from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL
from esolm_dist.eso.rows import build_rows, split_sizes

MASK = 3  # tokens 0..2 are real, 3 is [MASK]


def rows(x, alpha0, kappa, loss_type="elbo", eps=1e-3, seed=0, variant="B"):
    return build_rows(x, alpha0=alpha0, kappa=kappa, variant=variant, loss_type=loss_type, eps=eps, mask_id=MASK,
                      generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("alpha0,batch_split,kappa", [
    (1.0, -1.0, 1.0), (0.0, -1.0, 0.0), (0.25, -1.0, 0.5), (0.5, -1.0, 0.5), (0.125, 0.75, 0.75)])
def test_default_kappa_follows_the_paper(alpha0, batch_split, kappa):
    """Catches a wrong default batch_split: 1 for pure MDM, 0 for pure AR, 0.5 in between, else as set."""
    assert EsoConfig(alpha0=alpha0, batch_split=batch_split).kappa == kappa


# every (micro-batch, kappa) below passes config validation (micro * kappa an even integer)
@pytest.mark.parametrize("batch,kappa,sizes", [
    (8, 0.0, (0, 8)), (8, 0.25, (2, 6)), (8, 0.5, (4, 4)), (8, 0.75, (6, 2)), (8, 1.0, (8, 0)),
    (4, 0.5, (2, 2)),
    (100, 0.58, (58, 42)),  # 100 * 0.58 = 57.99999999999999 in floats: truncation would give 57
    (12, 1 / 6, (2, 10)),   # 12 * (1/6) = 2.0
])
def test_split_sizes(batch, kappa, sizes):
    """Catches an off-by-one (int() truncation, +1, ceil) or a swapped (diffusion, sequential) pair."""
    assert split_sizes(batch, kappa) == sizes


def original_sequences(r, length):
    """Each row's segments mapped back to original order: rows' targets at their positions."""
    out = []
    for row in range(r.tokens.shape[0]):
        segments = 2 if r.masks.kinds[row] == DIFFUSION_PAIR else 1
        for seg in range(segments):
            part = slice(seg * length, (seg + 1) * length)
            seq = torch.empty(length, dtype=torch.long)
            seq[r.positions[row, part]] = r.targets[row, part]
            out.append(seq)
    return torch.stack(out)


def test_first_kappa_b_sequences_get_the_mdm_loss():
    """Catches the halves swapped (the LAST kappa*b sequences diffused) or rows from the wrong count:
    b = 8, kappa = 0.75 -> sequences 0..5 in 3 diffusion pair rows, 6..7 in 2 sequential rows."""
    x = torch.randint(0, MASK, (8, 5), generator=torch.Generator().manual_seed(0))
    r = rows(x, alpha0=0.5, kappa=0.75)
    assert r.masks.kinds.tolist() == [DIFFUSION_PAIR] * 3 + [SEQUENTIAL] * 2
    assert torch.equal(original_sequences(r, 5), x)
    assert r.num_sequences == 8


@pytest.fixture()
def fixed_times(monkeypatch):
    """build_rows draws t through schedule.sample_t: pin it to t = (0.5, 1.0) (sample_t's own law is
    tested in test_eso_schedule.py)."""
    monkeypatch.setattr(schedule, "sample_t", lambda n, eps, gen: torch.tensor([0.5, 1.0])[:n])


# b = 3, kappa = 2/3 (valid: 3 * 2/3 = 2): one diffusion pair row (sequences 0, 1) and one
# sequential row (sequence 2), L = 4. Seed 0 masks original positions {0, 1} of sequence 0
# (t = 0.5), all of sequence 1 (t = 1, keep probability 0.05) and {1, 2} of sequence 2 (in z0).
X = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 1, 1]])
MASKED = [{0, 1}, {0, 1, 2, 3}, {1, 2}]


def weights_by_original_position(r):
    """loss_weight of each sequence at each original position (z0 half for the sequential row)."""
    out = torch.zeros(3, 4)
    for seq, (row, part) in enumerate([(0, slice(0, 4)), (0, slice(4, 8)), (1, slice(0, 4))]):
        out[seq, r.positions[row, part]] = r.loss_weight[row, part]
        masked = set(r.positions[row, part][r.tokens[row, part] == MASK].tolist())
        assert masked == MASKED[seq], "the seed's noise changed: recompute the hand numbers"
    return out


def test_per_half_per_token_normalisation_with_the_elbo_weight(fixed_times):
    """Catches per-batch normalisation (b L = 12 for both halves), per-sequence normalisation (L),
    normalising by masked tokens, a doubled / sign-flipped ELBO weight, and weight on clean tokens
    or on the x half of a sequential row."""
    r = rows(X, alpha0=0.5, kappa=2 / 3, eps=0.1)
    assert r.masks.kinds.tolist() == [DIFFUSION_PAIR, SEQUENTIAL] and r.tokens.shape == (2, 8)
    # -ELBO weight = alpha0 (1 - eps) / (1 - alpha_t), alpha_t = 0.5 (1 - 0.9 t):
    #   t = 0.5: 0.45 / (1 - 0.5 * 0.55) = 0.45 / 0.725;  t = 1: 0.45 / (1 - 0.05) = 0.45 / 0.95
    # diffusion half: 2 sequences x 4 tokens = 8; sequential half: 1 x 4 = 4
    w0, w1, ws = 0.45 / 0.725 / 8, 0.45 / 0.95 / 8, 1 / 4
    expected = torch.tensor([[w0, w0, 0, 0], [w1, w1, w1, w1], [0, ws, ws, 0]])
    torch.testing.assert_close(weights_by_original_position(r), expected, rtol=1e-6, atol=0)
    assert (r.loss_weight[1, 4:] == 0).all()  # the x half of [z0 ; x] predicts nothing


def test_per_half_per_token_normalisation_with_the_low_variance_weight(fixed_times):
    """Catches a low-variance weight other than 1 (e.g. the ELBO weight kept, or -1 kept negative)
    and the same normalisation bugs: 1 / 8 per diffusion mask, 1 / 4 per sequential mask."""
    r = rows(X, alpha0=0.5, kappa=2 / 3, eps=0.1, loss_type="low_var")
    d, s = 1 / 8, 1 / 4
    expected = torch.tensor([[d, d, 0, 0], [d, d, d, d], [0, s, s, 0]])
    torch.testing.assert_close(weights_by_original_position(r), expected, rtol=1e-6, atol=0)


def test_diffusion_masks_each_token_with_probability_one_minus_alpha_t(fixed_times):
    """Catches z_t drawn with the wrong keep probability (alpha_0 instead of alpha_t, 1 - alpha_t, or
    eps dropped): with t = 0.5, alpha0 = 0.5, eps = 0.1 a token stays clean w.p. 0.5 * 0.55 = 0.275."""
    x = torch.randint(0, MASK, (2, 4000), generator=torch.Generator().manual_seed(1))
    r = rows(x, alpha0=0.5, kappa=1.0, eps=0.1)
    masked = (r.tokens == MASK).view(2, 4000).double().mean(-1)  # sequence 0 (t=0.5), sequence 1 (t=1)
    # sd sqrt(0.275 * 0.725 / 4000) = 0.0071 -> 5 sigma = 0.035; alpha_0 = 0.5 would give 0.5, far out
    assert abs(masked[0].item() - 0.725) < 0.035
    # t = 1: keep w.p. 0.5 * 0.1 = 0.05; sd sqrt(0.05 * 0.95 / 4000) = 0.0034 -> 5 sigma = 0.017
    assert abs(masked[1].item() - 0.95) < 0.017


def test_sequential_z0_keeps_each_token_with_probability_alpha0():
    """Catches z0 ~ q0 with the wrong rate (1 - alpha_0, or alpha_t): alpha0 = 0.25 keeps 1/4."""
    x = torch.randint(0, MASK, (8, 500), generator=torch.Generator().manual_seed(2))
    r = rows(x, alpha0=0.25, kappa=0.0)
    z0 = r.tokens[:, :500]
    # 4000 tokens: sd sqrt(0.25 * 0.75 / 4000) = 0.0068 -> 5 sigma = 0.034
    assert abs((z0 == MASK).double().mean().item() - 0.75) < 0.034
    assert not (r.tokens[:, 500:] == MASK).any()  # the x half is clean
    assert r.masks.n_clean.tolist() == [[int((row != MASK).sum())] * 2 for row in z0]
