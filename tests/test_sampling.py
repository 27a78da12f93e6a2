"""Eso-LM sampling (paper Alg. 2 + 3), the exported network with its KV cache, and the export
folder reader/writer, on a tiny random-weight export with a tokenizer trained here."""

import hashlib
import json
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from esolm_dist import progress
from esolm_dist.eso import sampling
from esolm_dist.inference import cli
from esolm_dist.inference.export_io import ExportConfig, ExportError, read_export, write_export
from esolm_dist.inference.kv_cache import KVCache
from esolm_dist.inference.model import EsoLM

TOKENIZER_SIZE = 300
CONFIG = {"format": "esolm-export-v1", "vocab_size": 320, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
          "ffn_hidden_size": 128, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
          "eos_token_id": 0, "max_seq_len": 64, "variant": "B", "alpha0": 0.25, "dtype": "float32"}
LENGTH = 24


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A byte-level BPE with <|endoftext|> = 0 and [MASK] = 1, trained on a few sentences."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_SIZE, special_tokens=["<|endoftext|>", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the masked diffusion model fills the sequence in any order",
            "then the autoregressive part writes the rest from left to right"] * 20
    tokenizer.train_from_iterator(text, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    assert tokenizer.get_vocab_size() == TOKENIZER_SIZE
    return path


def _context_sensitive_model() -> EsoLM:
    """Random weights scaled so attention changes the logits a lot (a wrong mask or cache then
    changes the sampled tokens, not only the logits' last digits)."""
    torch.manual_seed(0)
    model = EsoLM(ExportConfig.from_dict(CONFIG, "test config"), TOKENIZER_SIZE)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and not name.startswith("embed"):
                param.normal_(0.0, 1.5 / math.sqrt(param.shape[1]))
            elif param.dim() == 1:
                param.add_(0.2 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tokenizer_path):
    root = tmp_path_factory.mktemp("exports") / "tiny"
    write_export(root, CONFIG, _context_sensitive_model().state_dict(), tokenizer_path, "# tiny test model\n")
    return root


@pytest.fixture(scope="module")
def model(export_dir):
    return EsoLM.from_pretrained(export_dir)


def _schedule(alpha0, seed=0, batch_size=2, num_steps=8):
    return sampling.first_hitting_schedule(batch_size, LENGTH, alpha0, num_steps, torch.Generator().manual_seed(seed))


def _assert_same_logits(got, want):
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), step
        finite = torch.isfinite(b)
        assert (a[finite] - b[finite]).abs().max() <= 1e-5, step


# ---- schedule (Alg. 2) ----

@pytest.mark.parametrize("alpha0", [0.0, 0.3, 1.0])
def test_schedule_covers_every_position_with_an_ascending_tail(alpha0):
    schedule = _schedule(alpha0, batch_size=3)
    assert sum(schedule.step_sizes) == LENGTH and min(schedule.step_sizes) >= 1
    assert torch.equal(schedule.order.sort(dim=1).values, torch.arange(LENGTH).expand(3, -1))
    num_diffusion_tokens = sum(schedule.step_sizes[:schedule.num_diffusion_steps])
    assert schedule.step_sizes[schedule.num_diffusion_steps:] == (1,) * (LENGTH - num_diffusion_tokens)
    tail = schedule.order[:, num_diffusion_tokens:]
    assert torch.equal(tail, tail.sort(dim=1).values)
    assert num_diffusion_tokens == {0.0: 0, 1.0: LENGTH}.get(alpha0, num_diffusion_tokens)


def _literal_alg2_step_sizes(length, alpha0, num_steps, generator):
    """Alg. 2 as written: t = 1, 1-1/T, ...; n_t ~ Binomial(masks left, (a_s - a_t) / (1 - a_t))."""
    sizes, masks_left = [], length
    for k in range(num_steps):
        alpha_t, alpha_s = alpha0 * (k / num_steps), alpha0 * ((k + 1) / num_steps)
        n = int(torch.binomial(torch.tensor(float(masks_left)), torch.tensor((alpha_s - alpha_t) / (1 - alpha_t)),
                               generator=generator))
        masks_left -= n
        sizes += [n] if n else []
    return sizes


def test_first_hitting_sizes_follow_the_binomial_chain_of_alg2():
    draws, length, alpha0, num_steps = 1500, 32, 0.6, 6
    generator = torch.Generator().manual_seed(0)
    ours = [sampling.first_hitting_step_sizes(length, alpha0, num_steps, generator) for _ in range(draws)]
    literal = [_literal_alg2_step_sizes(length, alpha0, num_steps, generator) for _ in range(draws)]
    sd_of_mean = math.sqrt(length * alpha0 * (1 - alpha0) / draws)
    for sizes in (ours, literal):
        assert abs(sum(map(sum, sizes)) / draws - length * alpha0) < 5 * sd_of_mean
    mean_steps = [sum(map(len, sizes)) / draws for sizes in (ours, literal)]
    assert abs(mean_steps[0] - mean_steps[1]) < 0.1, mean_steps
    assert max(map(len, ours)) <= num_steps


def test_subcontext_schedule_interleaves_positions():
    generator = torch.Generator().manual_seed(0)
    schedule = sampling.subcontext_schedule(2, LENGTH, 0.5, 4, shuffle=False, generator=generator)
    assert schedule.step_sizes == (6,) * 4 and schedule.num_diffusion_steps == 2
    assert schedule.steps()[1][0].tolist() == [1, 5, 9, 13, 17, 21]
    shuffled = sampling.subcontext_schedule(64, LENGTH, 0.5, 4, shuffle=True, generator=generator)
    firsts = {int(step[0]) for step in shuffled.steps()[0]}
    assert firsts == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="divide"):
        sampling.subcontext_schedule(1, LENGTH, 0.5, 5)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(2000, -1)
    generator = torch.Generator().manual_seed(0)
    assert set(sampling.nucleus_gumbel_sample(logits, 0.5, generator).tolist()) == {0, 1}
    assert set(sampling.nucleus_gumbel_sample(logits, 1e-6, generator).tolist()) == {0}
    counts = torch.bincount(sampling.nucleus_gumbel_sample(logits, 1.0, generator), minlength=4) / 2000
    assert torch.allclose(counts, torch.tensor([0.4, 0.3, 0.2, 0.1]), atol=0.05)


# ---- samplers (Alg. 3 and baselines) ----

def _run(sampler, model, schedule, seed=1, top_p=0.9):
    return sampler(model, schedule, top_p, torch.Generator().manual_seed(seed), record_logits=True)


@pytest.fixture(params=["KVCache", "StaticKVCache"])
def cache_layout(request, model):
    """The samplers' cache: model.static_kv_cache off or on (on CPU the static steps run eagerly)."""
    model.static_kv_cache = request.param == "StaticKVCache"
    yield request.param
    model.static_kv_cache = False


def _record_caches(monkeypatch, model):
    """The caches the samplers create, in order."""
    caches, new_kv_cache = [], model.new_kv_cache
    monkeypatch.setattr(model, "new_kv_cache", lambda *args: caches.append(new_kv_cache(*args)) or caches[-1])
    return caches


@pytest.mark.parametrize("alpha0,seed,batch_size", [(0.5, 0, 2), (0.25, 3, 3), (1.0, 4, 2), (0.0, 5, 1)])
def test_cached_eso_b_equals_uncached_reference(model, cache_layout, monkeypatch, alpha0, seed, batch_size):
    schedule = _schedule(alpha0, seed, batch_size)
    caches = _record_caches(monkeypatch, model)
    cached = _run(sampling.sample_eso_b, model, schedule, seed)
    assert type(caches[0]).__name__ == cache_layout
    uncached = _run(sampling.sample_eso_b_uncached, model, schedule, seed)
    assert torch.equal(cached.tokens, uncached.tokens)
    _assert_same_logits(cached.step_logits, uncached.step_logits)
    num_diffusion_tokens = sum(schedule.step_sizes[:schedule.num_diffusion_steps])
    assert cached.nfe == uncached.nfe == schedule.num_diffusion_steps + (LENGTH - num_diffusion_tokens)
    assert not (cached.tokens == CONFIG["mask_token_id"]).any()
    assert cached.tokens.max() < TOKENIZER_SIZE


def test_samples_depend_on_the_seed(model):
    schedule = _schedule(0.5)
    assert not torch.equal(_run(sampling.sample_eso_b, model, schedule, 1).tokens,
                           _run(sampling.sample_eso_b, model, schedule, 2).tokens)


def test_all_positions_without_a_cache_draws_the_same_samples(model):
    schedule = _schedule(0.5)
    mdlm = _run(sampling.sample_eso_b_all_positions, model, schedule)
    cached = _run(sampling.sample_eso_b, model, schedule)
    assert torch.equal(mdlm.tokens, cached.tokens)
    _assert_same_logits(mdlm.step_logits, cached.step_logits)


def test_alpha0_zero_is_left_to_right_ar(model):
    schedule = _schedule(0.0)
    assert schedule.nfe == LENGTH and schedule.num_diffusion_steps == 0
    assert torch.equal(schedule.order, torch.arange(LENGTH).expand(2, -1))
    eso = _run(sampling.sample_eso_b, model, schedule)
    assert torch.equal(_run(sampling.sample_eso_a, model, schedule).tokens, eso.tokens)
    ar = sampling.sample(model, 2, LENGTH, method="eso", alpha0=0.0, num_steps=8,
                         generator=torch.Generator().manual_seed(7))
    generator = torch.Generator().manual_seed(7)  # sample() draws its schedule, then the noise
    schedule = sampling.first_hitting_schedule(2, LENGTH, 0.0, 8, generator)
    assert torch.equal(ar.tokens, sampling.sample_eso_b(model, schedule, 0.9, generator).tokens)
    assert ar.nfe == LENGTH


def _eso_a_reference(model, schedule, seed):
    """Eso-LM (A) without any cache: every step recomputes decoded + S_k, diffusion-decoded tokens
    bidirectional among themselves, everything after them causal."""
    generator = torch.Generator().manual_seed(seed)
    canvas = torch.full_like(schedule.order, CONFIG["mask_token_id"])
    diffusion_tokens = sum(schedule.step_sizes[:schedule.num_diffusion_steps])
    start, logits_per_step = 0, []
    for k, positions in enumerate(schedule.steps()):
        end = start + positions.shape[1]
        bidirectional = start if k < schedule.num_diffusion_steps else diffusion_tokens
        mask = torch.ones(end, end, dtype=torch.bool).tril()
        mask[:bidirectional, :bidirectional] = True
        visible = schedule.order[:, :end]
        logits = model(canvas.gather(1, visible), visible, attn_mask=mask[None])[:, start:end]
        logits_per_step.append(logits)
        canvas.scatter_(1, positions, sampling.nucleus_gumbel_sample(logits, 0.9, generator))
        start = end
    return canvas, logits_per_step


@pytest.mark.parametrize("alpha0", [0.5, 1.0])
def test_eso_a_sequential_cache_equals_full_recompute(model, cache_layout, alpha0):
    schedule = _schedule(alpha0, seed=5)
    cached = _run(sampling.sample_eso_a, model, schedule, seed=2)
    with torch.inference_mode():
        tokens, logits = _eso_a_reference(model, schedule, seed=2)
    assert torch.equal(cached.tokens, tokens)
    _assert_same_logits(cached.step_logits, logits)
    assert not torch.equal(cached.tokens, _run(sampling.sample_eso_b, model, schedule, seed=2).tokens)


def test_sample_with_subcontext_schedule(model):
    result = sampling.sample(model, 2, LENGTH, variant="A", alpha0=0.5, subcontext_len=6,
                             generator=torch.Generator().manual_seed(0))
    assert result.nfe == 6 and not (result.tokens == CONFIG["mask_token_id"]).any()


@pytest.mark.parametrize("method,variant,subcontext_len", [("eso", "B", None), ("eso", "A", None),
                                                           ("eso", "B", 6)])
def test_on_step_reports_every_network_call_and_position_once(model, method, variant, subcontext_len):
    """What the progress bar counts: one call per network call (NFE), decoding each position once."""
    calls = []
    result = sampling.sample(model, 2, LENGTH, method=method, variant=variant, alpha0=0.5, num_steps=8,
                             subcontext_len=subcontext_len, generator=torch.Generator().manual_seed(0),
                             on_step=calls.append)
    assert len(calls) == result.nfe and sum(calls) == LENGTH


# ---- the network and its KV cache ----

@torch.inference_mode()
@pytest.mark.parametrize("sampler", [sampling.sample_eso_b, sampling.sample_eso_a])
def test_cache_after_sampling_holds_the_keys_and_values_of_a_recomputation(model, cache_layout, monkeypatch,
                                                                           sampler):
    """Every committed row: the keys/values of that token in one forward over the decoding order,
    causal ((B); (A): the diffusion-decoded tokens, cached together, bidirectional among themselves)."""
    schedule = _schedule(0.5, seed=6, batch_size=3)
    caches = _record_caches(monkeypatch, model)
    tokens = sampler(model, schedule, 0.9, torch.Generator().manual_seed(0)).tokens
    cache = caches[0]
    committed = LENGTH - schedule.step_sizes[-1]  # the last step's tokens are never fed back
    assert cache.length == committed
    order = schedule.order[:, :committed]
    mask = torch.ones(committed, committed, dtype=torch.bool).tril()
    if sampler is sampling.sample_eso_a:
        diffusion_tokens = sum(schedule.step_sizes[:schedule.num_diffusion_steps])
        mask[:diffusion_tokens, :diffusion_tokens] = True
    recomputed = KVCache(CONFIG["num_layers"], 3, CONFIG["num_heads"], model.config.head_dim, committed,
                         torch.device("cpu"), torch.float32)
    model(tokens.gather(1, order), order, attn_mask=mask[None], kv_cache=recomputed, cache_append=committed)
    for got, want in ((cache.keys, recomputed.keys), (cache.values, recomputed.values)):
        torch.testing.assert_close(got[:, :, :, :committed], want, rtol=0, atol=1e-5)


def test_cache_refuses_a_chunk_beyond_its_capacity(model, cache_layout):
    cache = model.new_kv_cache(1, 4)
    assert type(cache).__name__ == cache_layout
    with torch.inference_mode():
        model(torch.zeros(1, 3, dtype=torch.long), torch.arange(3)[None], kv_cache=cache, cache_append=3)
        with pytest.raises(ValueError, match="cannot take a chunk of 2"):
            model(torch.zeros(1, 2, dtype=torch.long), torch.arange(3, 5)[None], kv_cache=cache)
        with pytest.raises(ValueError, match="cannot keep the first 2 rows of a chunk of 1"):
            model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[3]]), kv_cache=cache, cache_append=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("sampler,alpha0", [(sampling.sample_eso_b, 0.5), (sampling.sample_eso_b, 0.0),
                                            (sampling.sample_eso_a, 0.5)])
def test_cuda_graph_steps_sample_what_eager_steps_sample(export_dir, monkeypatch, sampler, alpha0):
    """On a GPU the static cache's steps are captured and replayed: same tokens as the eager KVCache
    (which the CPU tests above hold to the uncached references)."""
    model = EsoLM.from_pretrained(export_dir, device="cuda")
    schedule = _schedule(alpha0, seed=7).to("cuda")
    caches = _record_caches(monkeypatch, model)

    def run(static):
        model.static_kv_cache = static
        return sampler(model, schedule, 0.9, torch.Generator("cuda").manual_seed(1), record_logits=True)

    graphed, eager = run(True), run(False)
    assert caches[0].graphs.num_captured >= 1 and caches[1].graphs is None  # the one-token steps replay a graph
    assert torch.equal(graphed.tokens, eager.tokens)
    _assert_same_logits(graphed.step_logits, eager.step_logits)

@torch.inference_mode()
def test_kv_cached_forward_equals_full_causal_forward(model):
    tokens = torch.randint(TOKENIZER_SIZE, (2, 12), generator=torch.Generator().manual_seed(0))
    positions = torch.stack([torch.randperm(40)[:12] for _ in range(2)])
    full = model(tokens, positions)
    cache, pieces, start = model.new_kv_cache(2, 12), [], 0
    for i, size in enumerate((3, 1, 5, 3)):
        chunk = slice(start, start + size)
        keep = size if i % 2 else torch.arange(size)  # the first rows by count, or by index
        pieces.append(model(tokens[:, chunk], positions[:, chunk], kv_cache=cache, cache_append=keep))
        start += size
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@torch.inference_mode()
def test_kv_cache_keeps_only_the_chosen_rows(model):
    tokens = torch.randint(TOKENIZER_SIZE, (1, 6), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(6)[None]
    cache = model.new_kv_cache(1, 6)
    model(tokens[:, :3], positions[:, :3], kv_cache=cache, cache_append=torch.tensor([0, 2]))
    assert cache.length == 2
    cached = model(tokens[:, 3:], positions[:, 3:], kv_cache=cache)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()
    mask[3:, 1] = False  # row 1 was not kept: the next chunk does not see it
    torch.testing.assert_close(cached, model(tokens, positions, attn_mask=mask[None])[:, 3:], rtol=0, atol=1e-5)


def test_export_round_trip_logits_and_never_sampled_ids(export_dir, model):
    original = _context_sensitive_model()
    tokens = torch.randint(TOKENIZER_SIZE, (1, 10))
    positions = torch.arange(10)[None]
    with torch.inference_mode():
        logits = model(tokens, positions)
        torch.testing.assert_close(logits, original(tokens, positions), rtol=0, atol=0)
    assert torch.isinf(logits[..., CONFIG["mask_token_id"]]).all()
    assert torch.isinf(logits[..., TOKENIZER_SIZE:]).all() and torch.isfinite(logits[..., 2:TOKENIZER_SIZE]).all()


def _spec_logits(state, tokens, positions):
    """design.md "The block" written out for one sequence, causal in the given order."""
    d, heads, eps = CONFIG["hidden_size"], CONFIG["num_heads"], CONFIG["layernorm_eps"]
    head_dim, seq = d // heads, len(tokens)
    half = head_dim // 2
    angles = positions[:, None].double() * CONFIG["rotary_base"] ** (-2.0 * torch.arange(half).double() / head_dim)
    cos, sin = angles.cos().float(), angles.sin().float()

    def rotate(t):  # [heads, seq, head_dim], halves (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        return torch.cat((t[..., :half] * cos - t[..., half:] * sin, t[..., half:] * cos + t[..., :half] * sin), -1)

    def layer_norm(t, name):
        centered = t - t.mean(-1, keepdim=True)
        return centered / torch.sqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * state[name + ".weight"] + state[name + ".bias"]

    x = state["embed.weight"][tokens]
    for i in range(CONFIG["num_layers"]):
        p = f"blocks.{i}."
        qkv = layer_norm(x, p + "ln1") @ state[p + "attn.qkv.weight"].T
        q, k, v = (qkv[:, j * d:(j + 1) * d].view(seq, heads, head_dim).transpose(0, 1) for j in range(3))
        scores = rotate(q) @ rotate(k).transpose(1, 2) / math.sqrt(head_dim)
        scores = scores.masked_fill(torch.ones(seq, seq).triu(1).bool(), float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(seq, d)
        x = x + attended @ state[p + "attn.out.weight"].T + state[p + "attn.out.bias"]
        h = layer_norm(x, p + "ln2") @ state[p + "mlp.fc1.weight"].T + state[p + "mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ state[p + "mlp.fc2.weight"].T + state[p + "mlp.fc2.bias"]
    return layer_norm(x, "final_ln") @ state["head.weight"].T + state["head.bias"]


@torch.inference_mode()
def test_network_follows_the_written_block_spec(export_dir, model):
    state = load_file(export_dir / "model.safetensors")
    tokens = torch.randint(TOKENIZER_SIZE, (10,), generator=torch.Generator().manual_seed(2))
    positions = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:10]
    logits = model(tokens[None], positions[None])[0]
    sampleable = torch.isfinite(logits[0])
    assert sampleable.sum() == TOKENIZER_SIZE - 1
    torch.testing.assert_close(logits[:, sampleable], _spec_logits(state, tokens, positions)[:, sampleable],
                               rtol=0, atol=1e-5)


@torch.inference_mode()
def test_bf16_model_rotates_q_and_k_in_fp32(export_dir, monkeypatch):
    """Rotary in a bf16 model: the exact rotation of its bf16 q/k, rounded to bf16 once (fp32 angles
    and arithmetic, as in training). Rounding the angles, cos/sin or products to bf16 is far off."""
    from esolm_dist.inference import model as model_module

    model = EsoLM.from_pretrained(export_dir, dtype=torch.bfloat16)
    seen = []
    attend = model_module.attend_after_cache
    monkeypatch.setattr(model_module, "attend_after_cache",
                        lambda q, k, *rest: seen.append((q, k)) or attend(q, k, *rest))
    tokens = torch.randint(TOKENIZER_SIZE, (1, 12), generator=torch.Generator().manual_seed(4))
    positions = torch.randperm(CONFIG["max_seq_len"], generator=torch.Generator().manual_seed(5))[:12][None]
    model(tokens, positions)
    heads, head_dim = CONFIG["num_heads"], model.config.head_dim
    block = model.blocks[0]
    qkv = block.attn.qkv(block.ln1(model.embed(tokens))).view(1, 12, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    half = head_dim // 2
    angles = positions[0, :, None].double() * CONFIG["rotary_base"] ** (-2.0 * torch.arange(half).double() / head_dim)

    def rotate(x, cos, sin):
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    for got, raw in zip(seen[0], qkv[:2], strict=True):
        exact = rotate(raw.double(), angles.cos(), angles.sin())
        half_ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 8)  # bf16: 8 significant bits
        error = (got.double() - exact).abs()
        assert (error <= half_ulp * (1 + 2**-10)).all()
        low = angles.to(torch.bfloat16)
        old = rotate(raw, low.cos(), low.sin()).double()  # angles, tables and arithmetic in bf16
        assert ((old - exact).abs() > 4 * half_ulp).any()


# ---- export folder errors ----

def _drop_tensor(root):
    weights = load_file(root / "model.safetensors")
    del weights["blocks.1.mlp.fc2.bias"]
    save_file(weights, root / "model.safetensors")


def _add_tensor(root):
    weights = load_file(root / "model.safetensors")
    weights["lm_head.weight"] = torch.zeros(3)
    save_file(weights, root / "model.safetensors")


def _reshape_tensor(root):
    weights = load_file(root / "model.safetensors")
    weights["blocks.0.attn.qkv.weight"] = torch.zeros(32, 96)
    save_file(weights, root / "model.safetensors")


def _truncate_weights(root):
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[:len(data) - 100])


def _edit_config(**changes):
    def edit(root):
        config = json.loads((root / "config.json").read_text())
        config.update(changes)
        (root / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    return edit


@pytest.mark.parametrize("corrupt,file_name,message", [
    (lambda root: (root / "tokenizer.json").unlink(), "tokenizer.json", "missing file"),
    (lambda root: (root / "model.safetensors").unlink(), "model.safetensors", "missing file"),
    (_drop_tensor, "model.safetensors", r"missing tensor\(s\) blocks.1.mlp.fc2.bias"),
    (_add_tensor, "model.safetensors", r"unexpected tensor\(s\) lm_head.weight"),
    (_reshape_tensor, "model.safetensors", r"blocks.0.attn.qkv.weight has shape \[32, 96\].*\[96, 32\]"),
    (_truncate_weights, "model.safetensors", "truncated safetensors"),
    (_edit_config(num_heads="4"), "config.json", '"num_heads" is .*expected a JSON int'),
    (_edit_config(rotary_base=None), "config.json", r"missing key\(s\) \['rotary_base'\]"),
    (_edit_config(format="esolm-export-v0"), "config.json", '"format" is'),
    (_edit_config(hidden_size=48), "model.safetensors", "embed.weight has shape"),
    (_edit_config(dtype="bfloat16"), "model.safetensors", 'is torch.float32, config.json says "dtype": "bfloat16"'),
    (_edit_config(mask_token_id=2), "tokenizer.json", r"\[MASK\] has id 1"),
])
def test_bad_export_gives_a_one_line_error(export_dir, tmp_path, corrupt, file_name, message):
    broken = tmp_path / "broken"
    write_export(broken, json.loads((export_dir / "config.json").read_text()),
                 load_file(export_dir / "model.safetensors"), export_dir / "tokenizer.json", "card")
    corrupt(broken)
    with pytest.raises(ExportError, match=message) as error:
        read_export(broken)
    text = str(error.value)
    assert "\n" not in text and file_name in text and ("re-run" in text or "use the" in text)


def test_write_export_is_atomic_and_refuses_to_clobber(export_dir, tmp_path):
    config = json.loads((export_dir / "config.json").read_text())
    weights = load_file(export_dir / "model.safetensors")
    with pytest.raises(ExportError, match="already exists"):
        write_export(export_dir, config, weights, export_dir / "tokenizer.json", "card")
    weights["head.bias"] = torch.zeros(7)
    with pytest.raises(ExportError, match="head.bias has shape"):
        write_export(tmp_path / "new", config, weights, export_dir / "tokenizer.json", "card")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_export_folder_follows_the_umask(export_dir, tmp_path, umask, folder_mode, file_mode):
    """Bug caught: exports created 0700 (tempfile's staging folder), unreadable to the rest of a team."""
    config = json.loads((export_dir / "config.json").read_text())
    weights = load_file(export_dir / "model.safetensors")
    previous = os.umask(umask)
    try:
        root = write_export(tmp_path / "shared", config, weights, export_dir / "tokenizer.json", "card")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(root.stat().st_mode) == folder_mode
    files = sorted(root.iterdir())
    assert [f.name for f in files] == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in files} == {f.name: file_mode for f in files}


def test_cli_writes_samples_with_nfe(export_dir, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    code = cli.main(["--model", str(export_dir), "--num-samples", "3", "--length", "16", "--batch-size", "2",
                     "--alpha0", "0.5", "--steps", "4", "--out", str(out)])
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [r["sample"] for r in records] == [0, 1, 2]
    assert all(len(r["token_ids"]) == 16 and "[MASK]" not in r["text"] and r["nfe"] <= 4 + 16 for r in records)
    assert "wall time" in capsys.readouterr().err
    assert cli.main(["--model", str(export_dir), "--length", "65"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_sample_file_records_the_settings_of_each_sample(export_dir, tmp_path, monkeypatch, capsys):
    """Bug caught: a samples file that does not say which model, sampler or seed drew it."""
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)  # a progress line at every step, as in a long job's log
    fingerprint = hashlib.sha256((export_dir / "config.json").read_bytes()).hexdigest()
    out = tmp_path / "given.jsonl"
    assert cli.main(["--model", str(export_dir), "--num-samples", "3", "--length", "16", "--batch-size", "2",
                     "--alpha0", "0.5", "--steps", "4", "--top-p", "0.8", "--seed", "3", "--method", "eso",
                     "--out", str(out)]) == 0
    given = {"method": "eso", "model_kind": "esolm", "variant": "B", "alpha0": 0.5, "steps": 4, "subcontext_len": None,
             "subcontext_shuffle": False, "top_p": 0.8, "seed": 3, "length": 16, "model": str(export_dir.resolve()),
             "model_config_sha256": fingerprint}
    for record in map(json.loads, out.read_text().splitlines()):
        assert {key: record[key] for key in given} == given
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("esolm-sample: decoding:")]
    assert lines and lines[-1].startswith("esolm-sample: decoding: 32/32 positions (100%)")  # 2 batches x 16
    # defaults are recorded as the values they resolve to: the export's alpha0 and variant, T = length
    assert cli.main(["--model", str(export_dir), "--length", "12", "--subcontext-len", "4", "--out",
                     str(tmp_path / "defaults.jsonl")]) == 0
    record = json.loads((tmp_path / "defaults.jsonl").read_text().splitlines()[0])
    assert {key: record[key] for key in ("method", "variant", "alpha0", "steps", "subcontext_len", "top_p", "seed")} \
        == {"method": "eso", "variant": CONFIG["variant"], "alpha0": CONFIG["alpha0"], "steps": None,
            "subcontext_len": 4, "top_p": 0.9, "seed": 0}
    assert cli.main(["--model", str(export_dir), "--length", "12", "--out", str(tmp_path / "t.jsonl")]) == 0
    assert json.loads((tmp_path / "t.jsonl").read_text().splitlines()[0])["steps"] == 12


def test_likelihood_reports_each_causal_pass(model):
    from esolm_dist.inference.likelihood import evaluate_likelihood

    batches = [torch.randint(2, TOKENIZER_SIZE, (2, LENGTH), generator=torch.Generator().manual_seed(seed))
               for seed in (0, 1)]
    passes = []
    evaluate_likelihood(model, batches, 3, 0.25, seed=0, on_pass=lambda: passes.append(1))
    assert len(passes) == 2 * 3  # one causal pass per order and batch
