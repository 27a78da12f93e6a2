"""Every attention backend available here matches the dense-mask SDPA reference on every mask spec."""

import pytest
import torch
from conftest import MASK_ID, random_tokens

from esolm_dist.eso.baselines import training_rows
from esolm_dist.eso.masks import RowMaskSpec
from esolm_dist.eso.rows import build_rows
from esolm_dist.kernels.attention import AttentionPlan, choose_backend, flash_attn_available, plan_attention


def mask_specs():
    """Both variants x both row kinds, with random clean counts; and the baselines' rows."""
    gen = torch.Generator().manual_seed(0)
    x = random_tokens(8, 16, seed=1)
    for variant in ("A", "B"):
        for alpha0, kappa in ((0.4, 0.5), (1.0, 1.0), (0.3, 0.0)):
            rows = build_rows(x, alpha0=alpha0, kappa=kappa, variant=variant, loss_type="elbo", eps=1e-3,
                              mask_id=MASK_ID, generator=gen)
            yield f"{variant}-kappa{kappa}", rows.masks
    for model, block_size in (("ar", 1), ("mdlm", 1), ("bd3lm", 4), ("bd3lm", 16)):  # the baselines (eso.model)
        rows = training_rows(x, model=model, alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo", eps=1e-3,
                             mask_id=MASK_ID, bos_id=0, block_size=block_size, generator=gen)
        yield f"{model}-{block_size}", rows.masks


SPECS = dict(mask_specs())


def backends_here():
    names = ["flex"]
    if flash_attn_available():
        names.append("flash")
    return names


def qkv(spec: RowMaskSpec, device="cpu", dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(2)
    shape = (spec.kinds.shape[0], 2, spec.row_len, 8)
    return [torch.randn(shape, generator=gen).to(device, dtype).requires_grad_(grad) for _ in range(3)]


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("backend", backends_here())
def test_backend_forward_matches_dense_reference(name, backend):
    spec = SPECS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if backend == "flash" and not spec.segments_if_causal():
        pytest.skip("flash-attn runs only plain causal segments (Eso-LM (B) diffusion rows)")
    dtype = torch.bfloat16 if backend == "flash" else torch.float32
    q, k, v = qkv(spec, device, dtype)
    reference = AttentionPlan("sdpa", dense_mask=spec.dense(device))(q, k, v)
    with torch.no_grad():
        plan = plan_attention(spec, torch.device(device), dtype, backend, needs_grad=False)
        assert plan.backend == backend
        out = plan(q, k, v)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(out.float(), reference.float(), atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward is not supported on CPU")
@pytest.mark.parametrize("name", sorted(SPECS))
def test_flex_backward_matches_dense_reference(name):
    spec = SPECS[name]
    q, k, v = qkv(spec, "cuda", grad=True)
    AttentionPlan("sdpa", dense_mask=spec.dense("cuda"))(q, k, v).square().sum().backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    plan_attention(spec, torch.device("cuda"), torch.float32, "flex")(q, k, v).square().sum().backward()
    for t, ref in zip((q, k, v), expected, strict=True):
        assert torch.allclose(t.grad, ref, atol=1e-4)


def test_auto_picks_sdpa_for_cpu_training_and_refuses_impossible_requests():
    spec = SPECS["B-kappa0.5"]
    assert choose_backend("auto", spec, torch.device("cpu"), torch.float32, needs_grad=True) == "sdpa"
    with pytest.raises(ValueError, match="flex cannot train on CPU"):
        choose_backend("flex", spec, torch.device("cpu"), torch.float32, needs_grad=True)
    with pytest.raises(ValueError, match="flash needs CUDA"):
        choose_backend("flash", spec, torch.device("cpu"), torch.float32, needs_grad=False)


def test_network_reports_backend_and_flex_forward_matches(tiny_network):
    spec_rows = build_rows(random_tokens(4, 8), alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo", eps=1e-3,
                           mask_id=MASK_ID, generator=torch.Generator().manual_seed(0))
    args = (spec_rows.tokens, spec_rows.positions, spec_rows.masks)
    with torch.no_grad():
        tiny_network.cfg.attention_backend = "sdpa"
        dense = tiny_network(*args)
        assert tiny_network.last_backend == "sdpa"
        tiny_network.cfg.attention_backend = "flex"
        flex = tiny_network(*args)
        assert tiny_network.last_backend == "flex"
    tiny_network.cfg.attention_backend = "auto"
    finite = torch.isfinite(dense)
    assert torch.allclose(flex[finite], dense[finite], atol=1e-5)


@pytest.mark.parametrize("cached", [0, 5])
def test_chunk_after_cache_matches_explicit_mask(cached):
    """Sampling attention: a chunk of 3 queries over `cached` rows + itself, causal in the chunk."""
    from esolm_dist.kernels.attention import attend_after_cache, choose_cached_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 3, 8, generator=gen).to(device)
    k, v = (torch.randn(2, 2, cached + 3, 8, generator=gen).to(device) for _ in range(2))
    explicit = torch.ones(3, cached + 3, dtype=torch.bool, device=device).tril(cached)
    expected = attend_after_cache(q, k, v, explicit[None, None], "sdpa")
    assert torch.allclose(attend_after_cache(q, k, v, None, "sdpa"), expected, atol=1e-6)
    if flash_attn_available():
        half = [t.bfloat16() for t in (q, k, v)]
        assert choose_cached_backend(half[0], None) == "flash"
        assert torch.allclose(attend_after_cache(*half, None, "flash").float(), expected, atol=2e-2)
    assert choose_cached_backend(q, None) == "sdpa"  # fp32 never takes flash-attn
