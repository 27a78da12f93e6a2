"""The MDM noise schedule (paper section 1, "Schedule" / "ELBO weight"), pinned by closed forms.

alpha_t = alpha_0 (1 - (1 - eps) t) for t in [eps, 1] (the reference code's t <- (1 - eps) t),
alpha_t' = -alpha_0 (1 - eps), ELBO weight alpha_t' / (1 - alpha_t). Every expected number below is
written out by hand; none is produced by esolm_dist.eso.schedule.
"""

import pytest
import torch

from esolm_dist.eso import schedule

# (alpha0, eps, t, alpha_t, alpha_t', weight), each computed by hand from the formulas above
CASES = [
    # 0.25 * (1 - 0.999 * 0.5) = 0.25 * 0.5005 = 0.125125; alpha' = -0.25 * 0.999 = -0.24975;
    # weight = -0.24975 / (1 - 0.125125) = -0.24975 / 0.874875
    (0.25, 1e-3, 0.5, 0.125125, -0.24975, -0.24975 / 0.874875),
    # alpha0 = 1 at t = 1: alpha_1 = 1 - 0.999 = 0.001; weight = -0.999 / 0.999 = -1
    (1.0, 1e-3, 1.0, 0.001, -0.999, -1.0),
    # alpha0 = 1 at t = eps: alpha = 1 - 0.999 * 0.001 = 0.999001; weight = -0.999 / 0.000999 = -1000
    (1.0, 1e-3, 1e-3, 0.999001, -0.999, -1000.0),
    # a large eps makes its role visible: alpha_1 = 0.5 * 0.1 = 0.05; alpha' = -0.5 * 0.9 = -0.45;
    # weight = -0.45 / 0.95
    (0.5, 0.1, 1.0, 0.05, -0.45, -0.45 / 0.95),
    # 0.5 * (1 - 0.9 * 0.2) = 0.5 * 0.82 = 0.41; weight = -0.45 / 0.59
    (0.5, 0.1, 0.2, 0.41, -0.45, -0.45 / 0.59),
    # 0.125 * (1 - 0.999 * 0.999) = 0.125 * 0.001999 = 0.000249875; alpha' = -0.124875;
    # weight = -0.124875 / 0.999750125
    (0.125, 1e-3, 0.999, 0.000249875, -0.124875, -0.124875 / 0.999750125),
    # alpha0 = 0 (pure AR): nothing is ever clean in the MDM sense and the weight vanishes
    (0.0, 1e-3, 0.3, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("alpha0,eps,t,alpha_t,alpha_prime_t,weight", CASES,
                         ids=[f"alpha0={c[0]}-eps={c[1]}-t={c[2]}" for c in CASES])
def test_schedule_closed_form(alpha0, eps, t, alpha_t, alpha_prime_t, weight):
    """Catches: a doubled or halved ELBO weight, a flipped sign, eps dropped from alpha_t or from
    alpha_t' (alpha_1 = 0.001 resp. 0.05 instead of 0), 1 - t in place of t, a dropped alpha_0."""
    tt = torch.tensor([t], dtype=torch.float64)
    assert schedule.alpha(tt, alpha0, eps).item() == pytest.approx(alpha_t, rel=1e-9, abs=1e-15)
    assert schedule.alpha_prime(tt, alpha0, eps).item() == pytest.approx(alpha_prime_t, rel=1e-9, abs=1e-15)
    assert schedule.elbo_weight(tt, alpha0, eps).item() == pytest.approx(weight, rel=1e-9, abs=1e-15)


def test_alpha_prime_is_the_derivative_of_alpha():
    """Catches an alpha_t' that disagrees with alpha_t (e.g. eps kept in one and dropped in the other):
    a central finite difference of alpha_t (exact for a linear schedule up to rounding)."""
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    h = 1e-4
    for alpha0, eps in ((0.3, 0.2), (1.0, 1e-3)):
        numeric = (schedule.alpha(t + h, alpha0, eps) - schedule.alpha(t - h, alpha0, eps)) / (2 * h)
        torch.testing.assert_close(schedule.alpha_prime(t, alpha0, eps), numeric, rtol=1e-8, atol=1e-10)


def test_antithetic_times_are_evenly_spaced_in_eps_to_one():
    """Catches i.i.d. times (no antithetic spacing), a spacing of 1/(n-1) or 1/n instead of (1-eps)/n,
    a missing modulo (times above 1) and times below eps."""
    eps, n = 0.1, 8
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        t = schedule.sample_t(n, eps, gen)
        assert t.shape == (n,) and t.dtype == torch.float32
        assert (t >= eps - 1e-6).all() and (t <= 1.0 + 1e-6).all()
        gaps = t.sort().values.diff()
        # sorted, the n points sit (1 - eps)/n = 0.9/8 = 0.1125 apart (one stratum each)
        torch.testing.assert_close(gaps, torch.full((n - 1,), 0.1125), rtol=0, atol=1e-5)


def test_antithetic_offset_is_uniform_and_each_time_is_uniform():
    """Catches a fixed or biased offset (e.g. u/n twice, u^2, u = 0) and a t law that is not U[eps, 1]:
    the lowest time's offset o = n (t_min - eps)/(1 - eps) must be U[0, 1), and each t_i U[eps, 1]."""
    eps, n, draws = 0.1, 4, 4000
    gen = torch.Generator().manual_seed(1)
    t = torch.stack([schedule.sample_t(n, eps, gen) for _ in range(draws)]).double()
    offset = n * (t.min(dim=1).values - eps) / (1 - eps)
    # U[0,1): mean 1/2, sd 1/sqrt(12) = 0.2887 -> sd of the mean 0.2887/sqrt(4000) = 0.0046; 5 sigma = 0.023
    assert abs(offset.mean().item() - 0.5) < 0.023
    # each quarter [k/4, (k+1)/4) holds 1/4: sd sqrt(0.25 * 0.75 / 4000) = 0.0068; 5 sigma = 0.034
    quarters = torch.bincount((offset * 4).long().clamp(max=3), minlength=4).double() / draws
    assert (quarters - 0.25).abs().max().item() < 0.034, quarters
    # t_0 alone is U[0.1, 1]: mean 0.55, sd 0.9/sqrt(12) = 0.26 -> sd of the mean 0.0041; 5 sigma = 0.021
    assert abs(t[:, 0].mean().item() - 0.55) < 0.021
    # the first time is not always the lowest one: the offset shifts which stratum t_0 lands in
    # (t_0 is lowest iff u < 1/n: probability 1/4, sd sqrt(0.1875 / 4000) = 0.0068; +-0.1 is ~15 sigma)
    assert 0.15 < (t[:, 0] == t.min(dim=1).values).double().mean().item() < 0.35
