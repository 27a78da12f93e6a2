"""esolm_dist.ema on one process: the EMA keeps each parameter as one flat fp32 slice (here the whole
parameter), and checkpoints written before the EMA was partitioned (whole shadows) still load."""

from __future__ import annotations

import pytest
import torch

from esolm_dist.ema import EMA


def test_one_process_keeps_whole_flat_parameters(tiny_network):
    ema = EMA(tiny_network, 0.9)
    for name, param in tiny_network.named_parameters():
        assert ema.slices[name] == (0, list(param.shape))
        assert torch.equal(ema.shadow[name], param.detach().reshape(-1))
    assert ema.nbytes() == 4 * sum(p.numel() for p in tiny_network.parameters())


def test_update_is_the_lerp_towards_the_weights(tiny_network):
    ema = EMA(tiny_network, 0.75)
    start = {name: p.detach().clone() for name, p in tiny_network.named_parameters()}
    with torch.no_grad():
        for param in tiny_network.parameters():
            param.add_(1.0)
    ema.update(tiny_network)
    for name, param in tiny_network.named_parameters():  # 0.75 * w + 0.25 * (w + 1) = w + 0.25
        assert torch.allclose(ema.shadow[name].view_as(param), start[name] + 0.25, atol=1e-6), name


def test_a_checkpoint_of_whole_shadows_still_loads(tiny_network):
    ema = EMA(tiny_network, 0.9)
    old = {"decay": 0.5, "shadow": {name: torch.full_like(p, 3.0) for name, p in tiny_network.named_parameters()}}
    ema.load_state_dict(old)
    assert ema.decay == 0.5
    for name, param in tiny_network.named_parameters():
        assert ema.shadow[name].shape == (param.numel(),) and bool((ema.shadow[name] == 3.0).all()), name


def test_a_slice_of_another_layout_is_refused(tiny_network):
    ema = EMA(tiny_network, 0.9)
    state = ema.state_dict()
    name = next(iter(state["slices"]))
    other = {**state, "slices": {**state["slices"], name: (4, state["slices"][name][1])}}
    with pytest.raises(ValueError, match=f"EMA slice of {name} is another layout's"):
        ema.load_state_dict(other)
