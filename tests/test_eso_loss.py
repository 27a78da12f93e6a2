"""The hybrid loss (v4 eq. 7 with batch_split) of a network whose logits we choose, by hand.

TableNet ignores context: a [MASK] input at original position l predicts the table row P[l]; a
clean input predicts uniform 1/3 (never scored, but a weight on a clean or x-half slot would add
log 3, which is not a multiple of log 2). Every scored -log p is then log 2 or 2 log 2.
"""

import math

import pytest
import torch
from torch import nn

from esolm_dist.eso import schedule
from esolm_dist.eso.loss import hybrid_loss
from esolm_dist.eso.rows import build_rows

MASK = 3
LN2 = math.log(2)
P = torch.tensor([[1 / 2, 1 / 4, 1 / 4],   # original position 0
                  [1 / 4, 1 / 2, 1 / 4],   # 1
                  [1 / 4, 1 / 4, 1 / 2],   # 2
                  [1 / 2, 1 / 4, 1 / 4]])  # 3


class TableNet(nn.Module):
    def forward(self, tokens, positions, masks):
        probs = torch.where((tokens == MASK).unsqueeze(-1), P[positions], torch.full((3,), 1 / 3))
        return torch.cat([probs.log(), torch.full(tokens.shape + (1,), float("-inf"))], dim=-1)


# b = 3, L = 4, kappa = 2/3: sequences 0, 1 -> one diffusion pair row, sequence 2 -> one sequential
# row. t is pinned to (0.5, 1.0); with seed 0 the masked original positions are {0, 1}, {0, 1, 2, 3}
# (diffusion) and {1, 2} (z0 of the sequential row); test_eso_batch_split.py checks that pattern.
X = torch.tensor([[0, 1, 2, 0], [1, 1, 0, 2], [2, 0, 1, 1]])
# -log p of the masked tokens:
#   seq 0 (x = 0 1 2 0), masks {0,1}: -log P[0,0] - log P[1,1] = ln2 + ln2 = 2 ln2
#   seq 1 (x = 1 1 0 2), all masked: P[0,1] = 1/4, P[1,1] = 1/2, P[2,0] = 1/4, P[3,2] = 1/4 -> 7 ln2
#   seq 2 (x = 2 0 1 1), masks {1,2}: P[1,0] = 1/4, P[2,1] = 1/4 -> 4 ln2
# ELBO weights (alpha0 = 0.5, eps = 0.1): t = 0.5 -> 0.45 / 0.725 = 18/29; t = 1 -> 0.45 / 0.95 = 9/19
# diffusion half / (2 sequences x 4): (18/29 * 2 + 9/19 * 7) ln2 / 8 = (684 + 1827) / 4408 ln2 = 2511/4408 ln2
# sequential half / (1 x 4): 4 ln2 / 4 = ln2
ELBO = {"loss_diffusion": 2511 / 4408 * LN2, "loss_sequential": LN2}
# low-variance weight 1: (2 + 7) ln2 / 8 = 9/8 ln2; sequential half unchanged
LOW_VAR = {"loss_diffusion": 9 / 8 * LN2, "loss_sequential": LN2}


@pytest.fixture()
def rows(monkeypatch):
    monkeypatch.setattr(schedule, "sample_t", lambda n, eps, gen: torch.tensor([0.5, 1.0])[:n])

    def build(loss_type):
        r = build_rows(X, alpha0=0.5, kappa=2 / 3, variant="B", loss_type=loss_type, eps=0.1, mask_id=MASK,
                       generator=torch.Generator().manual_seed(0))
        assert (r.tokens == MASK).sum() == 2 + 4 + 2, "the seed's noise changed: recompute the hand numbers"
        return r
    return build


def check(out, expected):
    for key, value in expected.items():
        assert out[key].item() == pytest.approx(value, rel=1e-6), key
    assert out["loss"].item() == pytest.approx(sum(expected.values()), rel=1e-6)


@pytest.mark.parametrize("loss_type,expected", [("elbo", ELBO), ("low_var", LOW_VAR)])
def test_hybrid_loss_by_hand(rows, loss_type, expected):
    """Catches a doubled / dropped ELBO weight, per-batch normalisation, the halves' losses averaged
    instead of summed, a scored clean or x-half slot (adds log 3), nll * 0 = nan leaking from -inf,
    and the two halves' sums swapped."""
    r = rows(loss_type)
    logp = torch.log_softmax(TableNet()(r.tokens, r.positions, r.masks), -1)
    nll = -logp.gather(-1, r.targets.unsqueeze(-1)).squeeze(-1)
    check(hybrid_loss(nll, r.loss_weight, r.masks.kinds), expected)


def test_hybrid_loss_ignores_infinite_nll_where_nothing_is_predicted(rows):
    """Catches a product nll * weight in place of the `where`: inf * 0 = nan would poison the loss."""
    r = rows("elbo")
    logp = torch.log_softmax(TableNet()(r.tokens, r.positions, r.masks), -1)
    nll = -logp.gather(-1, r.targets.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(r.loss_weight > 0, nll, torch.full_like(nll, float("inf")))
    check(hybrid_loss(nll, r.loss_weight, r.masks.kinds), ELBO)


@pytest.mark.parametrize("loss_type,expected", [("elbo", ELBO), ("low_var", LOW_VAR)])
def test_training_objective_by_hand(single_process, rows, loss_type, expected):
    """The same numbers through the engine's module (vocab-parallel cross entropy): catches the
    objective scoring the wrong targets or dropping the weights."""
    from esolm_dist.model.objective import EsoObjective, row_tensors

    r = rows(loss_type)
    check(EsoObjective(TableNet(), "B", 4)(*row_tensors(r)), expected)
