"""Model-level guarantees of the Eso-LM core: no leaks, exact likelihood, the alpha_0 limits."""

import math

import pytest
import torch
from conftest import MASK_ID, random_tokens

from esolm_dist.eso import schedule
from esolm_dist.eso.likelihood import likelihood_order, order_log_likelihood
from esolm_dist.eso.loss import hybrid_loss
from esolm_dist.eso.masks import DIFFUSION_PAIR, SEQUENTIAL, RowMaskSpec
from esolm_dist.eso.orders import gather_order, natural_order
from esolm_dist.eso.rows import build_rows


def nll_of(network, rows):
    logits = network(rows.tokens, rows.positions, rows.masks)
    return -torch.log_softmax(logits.float(), -1).gather(-1, rows.targets.unsqueeze(-1)).squeeze(-1)


def rows_of(x, alpha0, seed=0, variant="B", kappa=None, loss_type="elbo"):
    kappa = (1.0 if alpha0 == 1 else 0.0 if alpha0 == 0 else 0.5) if kappa is None else kappa
    return build_rows(x, alpha0=alpha0, kappa=kappa, variant=variant, loss_type=loss_type, eps=1e-3,
                      mask_id=MASK_ID, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["A", "B"])
def test_sequential_input_has_no_future_leak(tiny_network, variant):
    x = random_tokens(4, 8, seed=1)
    rows = rows_of(x, alpha0=0.5, kappa=0.0, variant=variant)
    length = 8
    with torch.no_grad():
        base = tiny_network(rows.tokens, rows.positions, rows.masks)
        for row in range(4):
            masked = (rows.tokens[row, :length] == MASK_ID).nonzero().flatten().tolist()
            for i in masked:
                changed = rows.tokens.clone()
                changed[row, length + i:] = (changed[row, length + i:] + 1) % MASK_ID  # x at sorted >= i
                out = tiny_network(changed, rows.positions, rows.masks)
                assert torch.allclose(out[row, i], base[row, i], atol=1e-6)
                if i > 0:  # the test can fail: x before i does matter
                    earlier = rows.tokens.clone()
                    earlier[row, length + i - 1] = (earlier[row, length + i - 1] + 1) % MASK_ID
                    assert not torch.allclose(tiny_network(earlier, rows.positions, rows.masks)[row, i],
                                              base[row, i], atol=1e-6)


def test_diffusion_input_ignores_masked_token_identity(tiny_network):
    x = random_tokens(4, 8, seed=2)
    rows = rows_of(x, alpha0=1.0)
    masked_original = rows.tokens == MASK_ID
    other = x.clone()
    # change every token that the diffusion input masks (in original coordinates)
    for pair in range(rows.tokens.shape[0]):
        for seg in range(2):
            seq = 2 * pair + seg
            pos = rows.positions[pair, seg * 8:(seg + 1) * 8][masked_original[pair, seg * 8:(seg + 1) * 8]]
            other[seq, pos] = (other[seq, pos] + 5) % MASK_ID
    rows_other = rows_of(other, alpha0=1.0)
    assert torch.equal(rows_other.tokens, rows.tokens) and not torch.equal(rows_other.targets, rows.targets)
    with torch.no_grad():
        assert torch.equal(tiny_network(rows.tokens, rows.positions, rows.masks),
                           tiny_network(rows_other.tokens, rows_other.positions, rows_other.masks))


def full_logits(network):
    return lambda tokens, positions, masks: network(tokens, positions, masks)


def test_one_pass_likelihood_equals_l_conditional_passes(tiny_network):
    x = random_tokens(3, 8, seed=3)
    gen = torch.Generator().manual_seed(4)
    orders = torch.stack([likelihood_order(8, 0.5, gen) for _ in range(3)])
    with torch.no_grad():
        one_pass = order_log_likelihood(full_logits(tiny_network), x, orders, MASK_ID)
        brute = torch.zeros(3, dtype=torch.float64)
        for b in range(3):
            sorted_x = x[b, orders[b]]
            for step in range(8):
                # diffusion input: sigma(<step) clean, the rest masked, causal in sigma order
                tokens = torch.where(torch.arange(8) < step, sorted_x, torch.full_like(sorted_x, MASK_ID))
                row = torch.cat([tokens, tokens]).unsqueeze(0)
                positions = torch.cat([orders[b], orders[b]]).unsqueeze(0)
                masks = RowMaskSpec("B", 8, torch.tensor([DIFFUSION_PAIR]), torch.tensor([[step, step]]))
                logp = torch.log_softmax(tiny_network(row, positions, masks)[0, step].double(), -1)
                brute[b] += logp[sorted_x[step]]
    assert torch.allclose(one_pass.double(), brute, atol=1e-5, rtol=0)


def test_alpha0_zero_is_autoregressive_nll(tiny_network):
    x = random_tokens(4, 8, seed=6)
    rows = rows_of(x, alpha0=0.0)
    assert bool((rows.masks.kinds == SEQUENTIAL).all())
    with torch.no_grad():
        loss = hybrid_loss(nll_of(tiny_network, rows), rows.loss_weight, rows.masks.kinds)["loss"]
        ar = -order_log_likelihood(full_logits(tiny_network), x, natural_order(4, 8), MASK_ID).mean() / 8
    assert torch.allclose(loss, ar, atol=1e-5)


def test_alpha0_one_is_the_mdm_elbo(tiny_network):
    x = random_tokens(4, 8, seed=7)
    rows = rows_of(x, alpha0=1.0, seed=11)
    assert bool((rows.masks.kinds == DIFFUSION_PAIR).all())
    t = schedule.sample_t(4, 1e-3, torch.Generator().manual_seed(11))  # the same first draw build_rows makes
    # -ELBO weight in closed form (not schedule.elbo_weight): alpha0 (1 - eps) / (1 - alpha0 (1 - (1 - eps) t)),
    # = 1 / t at alpha0 = 1 (sample_t's law is pinned in test_eso_schedule.py)
    weight = 0.999 / (1 - (1 - 0.999 * t))
    with torch.no_grad():
        loss = hybrid_loss(nll_of(tiny_network, rows), rows.loss_weight, rows.masks.kinds)["loss"]
        # independent: each sequence alone, plain causal attention in its sorted order, ELBO weight
        expected = 0.0
        for seq in range(4):
            pair, seg = divmod(seq, 2)
            part = slice(seg * 8, (seg + 1) * 8)
            tokens, positions = rows.tokens[pair, part], rows.positions[pair, part]
            row = torch.cat([tokens, tokens]).unsqueeze(0)
            masks = RowMaskSpec("B", 8, torch.tensor([DIFFUSION_PAIR]), torch.zeros(1, 2, dtype=torch.long))
            logp = torch.log_softmax(tiny_network(row, torch.cat([positions, positions]).unsqueeze(0), masks)[0, :8], -1)
            masked = tokens == MASK_ID
            target = gather_order(x[seq:seq + 1], positions.unsqueeze(0))[0]
            expected += weight[seq] * -logp[masked].gather(-1, target[masked].unsqueeze(-1)).sum()
        expected /= 4 * 8
    assert torch.allclose(loss, expected, atol=1e-5)


def test_low_variance_weight_is_plain_masked_cross_entropy():
    x = random_tokens(4, 8, seed=8)
    rows = rows_of(x, alpha0=1.0, loss_type="low_var")
    weights = rows.loss_weight[rows.tokens == MASK_ID]
    assert torch.allclose(weights, torch.full_like(weights, 1 / 32))
    assert (rows.loss_weight[rows.tokens != MASK_ID] == 0).all()


def test_mask_and_padding_ids_are_never_predicted(tiny_network):
    x = random_tokens(4, 8, seed=9)
    rows = rows_of(x, alpha0=0.5)
    with torch.no_grad():
        logits = tiny_network(rows.tokens, rows.positions, rows.masks)
    assert tiny_network.vocab_size > 37
    assert torch.isneginf(logits[..., MASK_ID]).all() and torch.isneginf(logits[..., 37:]).all()
    assert torch.isfinite(logits[..., :MASK_ID]).all()


def test_hybrid_loss_is_per_token_and_finite(tiny_network):
    x = random_tokens(8, 8, seed=10)
    rows = rows_of(x, alpha0=0.25)
    out = hybrid_loss(nll_of(tiny_network, rows), rows.loss_weight, rows.masks.kinds)
    assert all(torch.isfinite(v) for v in out.values())
    # at initialisation every prediction costs about log(V): NELBO/token ~ log(36)
    assert abs(out["loss"].item() - math.log(36)) < 1.0
    assert torch.allclose(out["loss"], out["loss_diffusion"] + out["loss_sequential"])


def test_rows_reject_mask_token_in_data():
    x = random_tokens(4, 8)
    x[0, 0] = MASK_ID
    with pytest.raises(ValueError, match="mask token"):
        rows_of(x, alpha0=0.5)


def test_activation_checkpointing_changes_nothing(tiny_network):
    x = random_tokens(4, 8, seed=12)
    rows = rows_of(x, alpha0=0.5)
    tiny_network.train()
    grads = []
    for recompute in (False, True):
        tiny_network.checkpoint_activations = recompute
        tiny_network.zero_grad()
        loss = hybrid_loss(nll_of(tiny_network, rows), rows.loss_weight, rows.masks.kinds)["loss"]
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in tiny_network.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads[0][1], grads[1][1], strict=True))
