"""What the samplers' attention actually sees is the paper's sampling mask (section 2), built here by
brute force in original positions: at step k, causal attention over (decoded u S_k) in the
decoding order; Eso-LM (A)'s recomputed steps instead let the clean tokens see each other in both
directions and the masks see every clean token. Checked through the real samplers and network,
both cache layouts, at the attention kernel's input."""

import pytest
import torch

from esolm_dist.eso import sampling
from esolm_dist.inference import model as inference_model
from esolm_dist.inference.export_io import ExportConfig
from esolm_dist.inference.model import EsoLM

CONFIG = {"format": "esolm-export-v1", "vocab_size": 40, "hidden_size": 16, "num_layers": 1, "num_heads": 2,
          "ffn_hidden_size": 32, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
          "eos_token_id": 0, "max_seq_len": 64, "variant": "B", "alpha0": 0.25, "dtype": "float32"}
MASK_ID = CONFIG["mask_token_id"]
LENGTH = 12


def brute_causal(query_ranks, key_ranks, query_clean, key_clean):
    """Key j is visible to query i iff it comes no later in the decoding order."""
    allowed = torch.zeros(len(query_ranks), len(key_ranks), dtype=torch.bool)
    for i, rank_i in enumerate(query_ranks):
        for j, rank_j in enumerate(key_ranks):
            allowed[i, j] = rank_j <= rank_i
    return allowed


def brute_prefix_lm(query_ranks, key_ranks, query_clean, key_clean):
    """Eso-LM (A): a clean key is visible to every query; a mask key only to masks at or after it."""
    allowed = torch.zeros(len(query_ranks), len(key_ranks), dtype=torch.bool)
    for i, rank_i in enumerate(query_ranks):
        for j, rank_j in enumerate(key_ranks):
            allowed[i, j] = bool(key_clean[j]) or (not query_clean[i] and rank_j <= rank_i)
    return allowed


class Recorder:
    """Every forward's chunk, the cache rows before it, and the mask handed to the attention kernel."""

    def __init__(self, model, monkeypatch):
        self.calls = []
        forward, attend = model.forward, inference_model.attend_after_cache

        def recording_forward(tokens, positions, attn_mask=None, kv_cache=None, cache_append=None, **kwargs):
            self.calls.append({"tokens": tokens.clone(), "positions": positions.clone(), "given": attn_mask is not None,
                               "cache": kv_cache, "append": cache_append, "mask": "unset"})
            return forward(tokens, positions, attn_mask, kv_cache, cache_append, **kwargs)

        def recording_attend(q, k, v, mask, backend):
            if self.calls[-1]["mask"] == "unset":  # every layer gets the same mask
                self.calls[-1]["mask"] = mask
            return attend(q, k, v, mask, backend)

        monkeypatch.setattr(model, "forward", recording_forward)
        monkeypatch.setattr(inference_model, "attend_after_cache", recording_attend)


def kernel_mask(call, cached: int):
    """The boolean [B or 1, S, keys] the kernel applied; None is SDPA's plain causal (nothing cached)."""
    mask, chunk = call["mask"], call["tokens"].shape[1]
    if mask is None:
        assert cached == 0
        return torch.ones(chunk, chunk, dtype=torch.bool).tril()[None]
    return mask.reshape(-1, *mask.shape[-2:])  # [B or 1, 1, S, keys], or [S, keys] broadcast


def check_masks(recorder, schedule, prefix_lm_calls):
    """Replays the calls, tracking which positions each cache holds, against the brute force."""
    ranks = torch.argsort(schedule.order, dim=1)  # rank[b, p]: where position p is decoded
    cached = {}  # id(cache) -> [B] lists of cached positions
    for number, call in enumerate(recorder.calls):
        cache, positions, tokens = call["cache"], call["positions"], call["tokens"]
        held = cached.setdefault(id(cache), [[] for _ in positions]) if cache is not None else [[] for _ in positions]
        brute = brute_prefix_lm if number in prefix_lm_calls else brute_causal
        assert call["given"] == (number in prefix_lm_calls)
        for b in range(len(positions)):
            mask = kernel_mask(call, len(held[b]))
            keys = held[b] + positions[b].tolist()
            key_clean = [True] * len(held[b]) + (tokens[b] != MASK_ID).tolist()  # the cache holds clean rows only
            expected = brute(ranks[b, positions[b]].tolist(), ranks[b, keys].tolist(),
                             (tokens[b] != MASK_ID).tolist(), key_clean)
            got = mask[min(b, len(mask) - 1)]
            assert torch.equal(got[:, :len(keys)], expected), f"call {number}, sequence {b}"
            assert not got[:, len(keys):].any()  # a static cache's rows not in use
        if call["append"] is not None:
            for b in range(len(positions)):
                held[b] += positions[b, :call["append"]].tolist()


@pytest.fixture(params=[False, True], ids=["KVCache", "StaticKVCache"])
def model(request):
    torch.manual_seed(0)
    network = EsoLM(ExportConfig.from_dict(CONFIG, "test config")).eval()
    network.static_kv_cache = request.param
    return network


@pytest.mark.parametrize("alpha0,seed", [(0.5, 0), (1.0, 1), (0.0, 2)])
def test_eso_b_samplers_attend_causally_in_the_decoding_order(model, monkeypatch, alpha0, seed):
    """Bugs caught: a chunk's queries misaligned with the cached rows (off-by-one diagonal)."""
    schedule = sampling.first_hitting_schedule(2, LENGTH, alpha0, 6, torch.Generator().manual_seed(seed))
    for sampler in (sampling.sample_eso_b, sampling.sample_eso_b_uncached,
                    sampling.sample_eso_b_all_positions):
        recorder = Recorder(model, monkeypatch)
        sampler(model, schedule, 0.9, torch.Generator().manual_seed(seed))
        assert len(recorder.calls) == schedule.nfe
        check_masks(recorder, schedule, prefix_lm_calls=())


@pytest.mark.parametrize("alpha0,seed", [(0.5, 3), (1.0, 4), (0.25, 5)])
def test_eso_a_recomputes_diffusion_steps_with_clean_tokens_bidirectional(model, monkeypatch, alpha0, seed):
    """Bugs caught: (A)'s clean tokens seeing masks, masks not seeing later clean tokens, the
    sequential phase's cached steps still bidirectional."""
    schedule = sampling.first_hitting_schedule(2, LENGTH, alpha0, 6, torch.Generator().manual_seed(seed))
    recorder = Recorder(model, monkeypatch)
    sampling.sample_eso_a(model, schedule, 0.9, torch.Generator().manual_seed(seed))
    # every diffusion step, and the first sequential step that fills the cache, is recomputed
    recomputed = min(schedule.num_diffusion_steps + 1, schedule.nfe)
    assert 0 < schedule.num_diffusion_steps < schedule.nfe or alpha0 == 1.0
    check_masks(recorder, schedule, prefix_lm_calls=range(recomputed))
