"""The baselines (eso.model: ar, mdlm, bd3lm) against brute force from their definitions.

Masks: every (query, key) pair from the definitions (AR causal, MDLM bidirectional, BD3-LM block
diffusion on [x_t ; x]), and FlexAttention's tiles from the key ranges against torch's
create_block_mask. Losses: the objective on the rows against a hand loop over positions that feeds
the exported plain-torch network each conditional's own input. Samplers: cached == uncached, and
every step's logits against a forward from the definition over the canvas of that step.
Training: each baseline trains, exports and samples in one process and in one parallel layout
(AR: TP=2, MDLM: PP=2, BD3-LM: DP=2 ZeRO-2), like one process (tests/parallel_driver.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from esolm_dist.eso import sampling
from esolm_dist.eso.baselines import training_rows
from esolm_dist.eso.masks import BIDIRECTIONAL, BLOCK_DIFFUSION, CAUSAL, SEQUENTIAL, RowMaskSpec
from esolm_dist.inference.export_io import ExportConfig
from esolm_dist.inference.model import EsoLM

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from conftest import MASK_ID, TINY_VOCAB, random_tokens  # noqa: E402

BOS = 0
EPS = 1e-3


def spec(model: str, length: int, rows: int = 1, block_size: int = 1) -> RowMaskSpec:
    kind = {"ar": CAUSAL, "mdlm": BIDIRECTIONAL, "bd3lm": BLOCK_DIFFUSION}[model]
    return RowMaskSpec("B", length, torch.full((rows,), kind), torch.zeros(rows, 2, dtype=torch.long),
                       model=model, block_size=block_size)


def bd3lm_brute_mask(length: int, block_size: int) -> torch.Tensor:
    """[2L, 2L] from the definition: x_t query of block b sees x_t block b and x blocks < b; an x
    query sees the x blocks up to its own."""
    mask = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            q_noisy, k_noisy = q < length, k < length
            q_block, k_block = (q % length) // block_size, (k % length) // block_size
            if q_noisy:
                mask[q, k] = (k_noisy and k_block == q_block) or (not k_noisy and k_block < q_block)
            else:
                mask[q, k] = not k_noisy and k_block <= q_block
    return mask


# ---- masks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1, 3, 6])
def test_ar_and_mdlm_masks(length):
    brute_causal = torch.tensor([[k <= q for k in range(length)] for q in range(length)])
    assert torch.equal(spec("ar", length, 2).dense()[:, 0], brute_causal.expand(2, -1, -1))
    assert spec("mdlm", length, 2).dense().all() and spec("mdlm", length).dense().shape == (1, 1, length, length)


@pytest.mark.parametrize("length,block_size", [(4, 1), (4, 2), (4, 4), (8, 2), (8, 4)])
def test_bd3lm_mask_is_the_block_diffusion_mask(length, block_size):
    assert torch.equal(spec("bd3lm", length, 1, block_size).dense()[0, 0], bd3lm_brute_mask(length, block_size))


@pytest.mark.parametrize("length", [3, 8])
def test_bd3lm_with_block_one_is_eso_lm_b_sequential_mask(length):
    """Paper section 2: the sequential mask is BD3-LM's with block size 1 (in the sorted order)."""
    sequential = RowMaskSpec("B", length, torch.tensor([SEQUENTIAL]), torch.tensor([[1, 1]])).dense()
    assert torch.equal(spec("bd3lm", length, 1, 1).dense(), sequential)


@pytest.mark.parametrize("model,length,block_size,tile", [("ar", 10, 1, 4), ("mdlm", 9, 1, 4),
                                                          ("bd3lm", 8, 2, 4), ("bd3lm", 12, 4, 8),
                                                          ("bd3lm", 6, 1, 4)])
def test_flex_tiles_from_two_key_ranges_equal_create_block_mask(model, length, block_size, tile):
    from torch.nn.attention.flex_attention import create_block_mask

    from esolm_dist.kernels.flex_masks import build_block_mask

    masks = spec(model, length, 2, block_size)
    ours = build_block_mask(masks, tile)
    reference = create_block_mask(masks.mask_mod(), 2, None, masks.row_len, masks.row_len, device="cpu",
                                  BLOCK_SIZE=tile)
    for counts, indices in (("kv_num_blocks", "kv_indices"), ("full_kv_num_blocks", "full_kv_indices")):
        assert torch.equal(getattr(ours, counts), getattr(reference, counts)), counts
        used = torch.arange(ours.kv_indices.shape[-1]) < getattr(ours, counts)[..., None]
        assert torch.equal(torch.where(used, getattr(ours, indices), -1).sort(-1).values,
                           torch.where(used, getattr(reference, indices), -1).sort(-1).values), indices


def test_mask_pairs_of_the_baselines_count_the_dense_masks():
    from esolm_dist.flops import mask_pairs

    for model, length, block_size in (("ar", 8, 1), ("mdlm", 8, 1), ("bd3lm", 8, 1), ("bd3lm", 8, 4)):
        masks = spec(model, length, 3, block_size)
        assert mask_pairs(masks).tolist() == [int(masks.dense()[0].sum())] * 3, model


# ---- losses against a hand loop over positions ----------------------------------------------------

EXPORT_CONFIG = {"format": "esolm-export-v1", "vocab_size": 40, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                 "ffn_hidden_size": 128, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": MASK_ID,
                 "eos_token_id": BOS, "max_seq_len": 8, "variant": "B", "alpha0": 1.0, "dtype": "float32"}


@pytest.fixture()
def trained_pair(tiny_network):
    """The training network and the same weights as the exported plain-torch model."""
    from esolm_dist.weight_layout import to_reference_layout

    with torch.no_grad():  # make the outputs depend on the inputs clearly
        for parameter in tiny_network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    state = {n: t for n, t in tiny_network.state_dict().items() if not n.endswith("_extra_state")}
    weights = to_reference_layout(state, num_heads=4)
    exported = EsoLM(ExportConfig.from_dict(EXPORT_CONFIG, "test"), TINY_VOCAB)
    exported.load_state_dict(weights)
    return tiny_network, exported.eval()


def objective_loss(network, model, x, block_size=1, seed=0):
    from esolm_dist.model.objective import EsoObjective, row_tensors

    rows = training_rows(x, model=model, alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo", eps=EPS,
                         mask_id=MASK_ID, bos_id=BOS, block_size=block_size,
                         generator=torch.Generator().manual_seed(seed))
    objective = EsoObjective(network, "B", x.shape[1], model, block_size)
    with torch.no_grad():
        return objective(*row_tensors(rows))


def nll(exported, tokens, positions, mask, rows, targets) -> torch.Tensor:
    """-log p(target) at the given rows of one sequence's forward under ``mask``."""
    with torch.no_grad():
        logits = exported(tokens[None], positions[None], attn_mask=mask[None])[0]
    return -logits.log_softmax(-1)[rows, targets]


def test_ar_loss_is_the_mean_next_token_nll(trained_pair):
    network, exported = trained_pair
    x = random_tokens(2, 8, seed=1)
    out = objective_loss(network, "ar", x)
    expected = 0.0
    for s in range(2):
        for i in range(8):  # p(x_i | BOS, x_<i) from the prefix alone
            prefix = torch.cat([torch.tensor([BOS]), x[s, :i]])
            mask = torch.ones(i + 1, i + 1, dtype=torch.bool).tril()
            expected += float(nll(exported, prefix, torch.arange(i + 1), mask, [i], x[s, i:i + 1]))
    expected /= 16
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss_sequential"]) == pytest.approx(expected, rel=1e-5) and float(out["loss_diffusion"]) == 0


def replayed_noise(n, length, times_per_sequence, seed):
    """The rows' noise protocol: antithetic t (schedule.sample_t) first, then one uniform per token."""
    from esolm_dist.eso.schedule import sample_t

    generator = torch.Generator().manual_seed(seed)
    t = sample_t(n * times_per_sequence, EPS, generator).view(n, times_per_sequence)
    return t, torch.rand((n, length), generator=generator)


def test_mdlm_loss_is_the_elbo_with_weight_one_over_t(trained_pair):
    network, exported = trained_pair
    x = random_tokens(2, 8, seed=2)
    out = objective_loss(network, "mdlm", x, seed=3)
    t, u = replayed_noise(2, 8, 1, seed=3)
    expected = 0.0
    for s in range(2):
        masked = u[s] >= 1 - (1 - EPS) * t[s, 0]  # alpha_t = 1 - (1 - eps) t at alpha0 = 1
        z = torch.where(masked, MASK_ID, x[s])
        rows = masked.nonzero()[:, 0]
        # the ELBO weight alpha_t' / (1 - alpha_t) = -(1 - eps) / ((1 - eps) t) = -1/t
        expected += float(nll(exported, z, torch.arange(8), torch.ones(8, 8, dtype=torch.bool), rows,
                              x[s, rows]).sum()) / float(t[s, 0])
    expected /= 16
    assert expected > 0
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss_diffusion"]) == pytest.approx(expected, rel=1e-5) and float(out["loss_sequential"]) == 0


def bd3lm_block_nll(exported, clean_prefix, noisy_block, start, block_size):
    """Logits of a noisy block given the clean blocks before it, from the definition: the input is
    [x_<b ; x_t^b] at their original positions, the clean part block-causal, the noisy block seeing
    all clean tokens and itself. Returns a function of (rows in the block, targets) -> nll."""
    tokens = torch.cat([clean_prefix, noisy_block])
    positions = torch.cat([torch.arange(start), start + torch.arange(block_size)])
    size = len(tokens)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for q in range(size):
        for k in range(size):
            if q < start:
                mask[q, k] = k < start and k // block_size <= q // block_size
            else:
                mask[q, k] = True
    with torch.no_grad():
        return exported(tokens[None], positions[None], attn_mask=mask[None])[0, start:]


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_bd3lm_loss_sums_each_blocks_elbo_with_its_own_t(trained_pair, block_size):
    network, exported = trained_pair
    x = random_tokens(2, 8, seed=4)
    out = objective_loss(network, "bd3lm", x, block_size, seed=5)
    blocks = 8 // block_size
    t, u = replayed_noise(2, 8, blocks, seed=5)
    expected = 0.0
    for s in range(2):
        for b in range(blocks):
            span = slice(b * block_size, (b + 1) * block_size)
            masked = u[s, span] >= 1 - (1 - EPS) * t[s, b]
            noisy = torch.where(masked, MASK_ID, x[s, span])
            logits = bd3lm_block_nll(exported, x[s, :b * block_size], noisy, b * block_size, block_size)
            rows = masked.nonzero()[:, 0]
            expected += float(-logits.log_softmax(-1)[rows, x[s, span][rows]].sum()) / float(t[s, b])
    expected /= 16
    assert expected > 0
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(out["loss_diffusion"]) == pytest.approx(expected, rel=1e-5)


# ---- samplers ------------------------------------------------------------------------------------

def baseline_model(model: str, block_size: int = 1, static_cache: bool = False) -> EsoLM:
    torch.manual_seed(0)
    config = ExportConfig.from_dict({**EXPORT_CONFIG, "model": model, "block_size": block_size}, "test")
    network = EsoLM(config, TINY_VOCAB).eval()
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    network.static_kv_cache = static_cache
    return network


def run(sampler, model, schedule, seed=0):
    return sampler(model, schedule, 0.9, torch.Generator().manual_seed(seed), record_logits=True)


def assert_same_logits(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        finite = torch.isfinite(y)
        assert torch.equal(torch.isfinite(x), finite)
        assert (x[finite] - y[finite]).abs().max() < 1e-4


def canvas_before(tokens, schedule, step):
    """The canvas a sampler saw at ``step``: the final tokens where earlier steps decoded, masks elsewhere."""
    canvas = torch.full_like(tokens, MASK_ID)
    decoded = schedule.order[:, :sum(schedule.step_sizes[:step])]
    return canvas.scatter(1, decoded, tokens.gather(1, decoded))


@pytest.mark.parametrize("static_cache", [False, True])
def test_ar_sampler_cached_equals_uncached_and_next_token_logits(static_cache):
    model = baseline_model("ar", static_cache=static_cache)
    schedule = sampling.left_to_right_schedule(3, 8)
    cached = run(sampling.sample_ar, model, schedule)
    uncached = run(sampling.sample_ar_uncached, model, schedule)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.nfe == uncached.nfe == 8
    assert_same_logits(cached.step_logits, uncached.step_logits)
    with torch.no_grad():  # step 0: the model's distribution after BOS at position 0
        first = model(torch.full((3, 1), BOS), torch.zeros(3, 1, dtype=torch.long))
    assert_same_logits(cached.step_logits[:1], [first])
    for i in range(1, 8):  # step i: the causal forward over [BOS, x_<i]
        fed = torch.cat([torch.full((3, 1), BOS), cached.tokens[:, :i]], dim=1)
        with torch.no_grad():
            expected = model(fed, torch.arange(i + 1).expand(3, -1))[:, -1:]
        assert_same_logits(cached.step_logits[i:i + 1], [expected])


def test_mdlm_sampler_runs_the_bidirectional_network_on_every_steps_canvas():
    model = baseline_model("mdlm")
    schedule = sampling.first_hitting_schedule(2, 8, 1.0, 5, torch.Generator().manual_seed(1))
    result = run(sampling.sample_mdlm, model, schedule, seed=2)
    assert result.nfe == schedule.nfe == len(schedule.step_sizes) and sum(schedule.step_sizes) == 8
    assert not (result.tokens == MASK_ID).any()
    for step, positions in enumerate(schedule.steps()):
        canvas = canvas_before(result.tokens, schedule, step)
        with torch.no_grad():
            logits = model(canvas, torch.arange(8).expand(2, -1), attn_mask=torch.ones(1, 8, 8, dtype=torch.bool))
        expected = logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
        assert_same_logits(result.step_logits[step:step + 1], [expected])


@pytest.mark.parametrize("block_size", [1, 2, 4])
@pytest.mark.parametrize("static_cache", [False, True])
def test_bd3lm_sampler_cached_equals_uncached_and_the_definition(block_size, static_cache):
    model = baseline_model("bd3lm", block_size, static_cache)
    schedule = sampling.block_schedule(2, 8, block_size, 3, torch.Generator().manual_seed(block_size))
    cached = run(sampling.sample_bd3lm, model, schedule, seed=3)
    uncached = run(sampling.sample_bd3lm_uncached, model, schedule, seed=3)
    assert torch.equal(cached.tokens, uncached.tokens) and cached.nfe == uncached.nfe == schedule.nfe
    assert_same_logits(cached.step_logits, uncached.step_logits)
    assert not (cached.tokens == MASK_ID).any()
    for step, positions in enumerate(schedule.steps()):
        block = int(positions[0, 0]) // block_size
        assert (positions // block_size == block).all()  # a step stays inside one block
        canvas = canvas_before(cached.tokens, schedule, step)
        start = block * block_size
        expected = torch.stack([bd3lm_block_nll(model, canvas[s, :start], canvas[s, start:start + block_size],
                                                start, block_size) for s in range(2)])
        expected = expected.gather(1, (positions - start)[..., None].expand(-1, -1, expected.shape[-1]))
        assert_same_logits(cached.step_logits[step:step + 1], [expected])


def test_block_schedule_decodes_blocks_left_to_right():
    schedule = sampling.block_schedule(3, 12, 4, 2, torch.Generator().manual_seed(0))
    assert sorted(schedule.order[0].tolist()) == list(range(12))
    assert (schedule.order[:, :4] < 4).all() and (schedule.order[:, 8:] >= 8).all()
    assert 3 <= schedule.nfe <= 6  # 1 or 2 non-empty steps per block


@pytest.mark.parametrize("model,method,nfe", [("ar", None, 8), ("mdlm", None, None), ("bd3lm", None, None),
                                              ("esolm", "eso", None)])
def test_sample_uses_the_models_own_method(model, method, nfe):
    network = baseline_model(model, block_size=2 if model == "bd3lm" else 1)
    calls = []
    result = sampling.sample(network, 2, 8, method=method, num_steps=4, generator=torch.Generator().manual_seed(0),
                             on_step=calls.append)
    assert result.tokens.shape == (2, 8) and not (result.tokens == MASK_ID).any()
    assert len(calls) == result.nfe and sum(calls) == 8
    if nfe is not None:
        assert result.nfe == nfe
    if model == "bd3lm":  # T = 4 over 4 blocks of 2: one step per block
        assert result.nfe == 4


@pytest.mark.parametrize("model,method", [("ar", "eso"), ("esolm", "ar"), ("mdlm", "bd3lm"), ("bd3lm", "mdlm")])
def test_a_method_the_model_cannot_do_is_one_line(model, method):
    with pytest.raises(ValueError, match=f"method '{method}' samples .* this is an {model} model; use method") as err:
        sampling.sample(baseline_model(model), 1, 8, method=method)
    assert "\n" not in str(err.value)


# ---- configuration and export fields ----------------------------------------------------------------

def test_config_keys_of_the_baselines():
    from esolm_dist.config import ConfigError, load_config

    cfg = load_config(None, ["eso.model=bd3lm", "eso.block_size=8"])
    assert cfg.eso.model == "bd3lm" and cfg.eso.model_alpha0 == 1.0
    assert load_config(None, ["eso.model=ar", "train.micro_batch_size=2", "train.global_batch_size=2"]).eso.model_alpha0 == 0
    with pytest.raises(ConfigError, match="'eso.block_size' \\(3\\) must divide model.seq_len \\(128\\)"):
        load_config(None, ["eso.model=bd3lm", "eso.block_size=3"])
    with pytest.raises(ConfigError, match="'eso.model' is 'gpt'; allowed values: esolm, ar, mdlm, bd3lm"):
        load_config(None, ["eso.model=gpt"])


def test_exports_without_a_model_field_are_eso_lms():
    config = ExportConfig.from_dict(EXPORT_CONFIG, "old config.json")
    assert (config.model, config.block_size) == ("esolm", 1)
    with pytest.raises(ValueError, match='"model" must be one of'):
        ExportConfig.from_dict({**EXPORT_CONFIG, "model": "gpt"}, "config.json")
    with pytest.raises(ValueError, match='"block_size" must be positive and divide "max_seq_len"'):
        ExportConfig.from_dict({**EXPORT_CONFIG, "model": "bd3lm", "block_size": 3}, "config.json")


# ---- training, export and sampling, in one process and one parallel layout each --------------------

@pytest.fixture(scope="module")
def launches(tmp_path_factory, shard_dir):
    """tests/parallel_driver.py: the baselines at world size 1 (the references), then one launch at
    world size 2 running AR TP=2, MDLM PP=2 and BD3-LM DP=2 ZeRO-2 in sequence."""
    from test_parallel import launch_driver

    out = tmp_path_factory.mktemp("baselines")
    codes = {}
    for world_size, layouts in ((1, "ar_single,mdlm_single,bd3lm_single,bd3lm_single_as_dp2"),
                                (2, "ar_tp2,mdlm_pp2,bd3lm_dp2_zero2")):
        code, log, _ = launch_driver(world_size, out, shard_dir, ["--layouts", layouts])
        codes[world_size] = (code, log[-6000:])
    return out, codes


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ar_tp2", "mdlm_pp2", "bd3lm_dp2_zero2"])
def test_baseline_trains_in_a_parallel_layout_like_one_process(launches, layout):
    from test_parallel import GRAD_NORM_RTOL, LOSS_RTOL, WEIGHT_ABS, WEIGHT_REL_NORM, load

    out, codes = launches
    for code, log in codes.values():
        assert code == 0, log
    got, got_weights = load(out, layout)
    ref, ref_weights = load(out, got["reference"])
    assert got["steps"] == ref["steps"] == [1, 2, 3, 4]
    assert got["loss"] == pytest.approx(ref["loss"], rel=LOSS_RTOL)
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=GRAD_NORM_RTOL)
    for name, b in ref_weights["params"].items():
        a = got_weights["params"][name]
        assert float((a - b).norm() / b.norm().clamp_min(1e-12)) <= WEIGHT_REL_NORM, name
        assert float((a - b).abs().max()) <= WEIGHT_ABS, name
    moved = max(float((ref_weights["params"][n] - ref_weights["ema"][n]).abs().max()) for n in ref_weights["params"])
    assert moved > 1e-3  # the weights trained: a comparison of untrained weights would prove little


@pytest.mark.slow
@pytest.mark.parametrize("layout,model", [("ar_single", "ar"), ("mdlm_single", "mdlm"), ("bd3lm_single", "bd3lm"),
                                          ("ar_tp2", "ar"), ("mdlm_pp2", "mdlm"), ("bd3lm_dp2_zero2", "bd3lm")])
def test_baseline_exports_and_samples_with_its_method(launches, layout, model, tmp_path, capsys):
    from esolm_dist.convert import export
    from esolm_dist.inference.cli import main as sample_main
    from esolm_dist.inference.export_io import read_export

    out, codes = launches
    assert all(code == 0 for code, _ in codes.values())
    path = export(out / layout / "checkpoints" / "latest", tmp_path / "export", verify=True)
    config = read_export(path).config
    assert config.model == model and config.block_size == (8 if model == "bd3lm" else 1)
    assert config.alpha0 == (0.0 if model == "ar" else 1.0)
    samples = tmp_path / "samples.jsonl"
    assert sample_main(["--model", str(path), "--length", "16", "--num-samples", "2", "--steps", "8",
                        "--out", str(samples)]) == 0
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["method"] for r in records] == [model] * 2 and all(len(r["token_ids"]) == 16 for r in records)
    expected_nfe = {"ar": 16, "mdlm": None, "bd3lm": None}[model]
    assert expected_nfe is None or records[0]["nfe"] == expected_nfe
    capsys.readouterr()
    wrong = "ar" if model != "ar" else "eso"
    assert sample_main(["--model", str(path), "--length", "16", "--method", wrong]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--method {wrong} samples" in err and str(path) in err, err


@pytest.mark.parametrize("model,row_len,pairs", [("ar", 16, 16 * 17 // 2), ("mdlm", 16, 16 * 16),
                                                 ("bd3lm", 32, 16 * (16 + 4))])
def test_training_flops_count_the_baselines_rows(model, row_len, pairs):
    """Model FLOPs of one micro-batch, by hand: rows of L (ar, mdlm) or 2L (bd3lm) tokens, the
    matmuls per token and 4d per allowed pair per layer; x 3 for forward + backward."""
    from esolm_dist.config import load_config
    from esolm_dist.flops import training_step_flops

    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=16",
                             "train.micro_batch_size=4", "train.global_batch_size=4", f"eso.model={model}",
                             "model.attention_backend=sdpa"])
    d, f, layers, vocab = 32, 128, 2, 64
    tokens = 4 * row_len
    forward = tokens * 2 * layers * (4 * d * d + 2 * d * f) + tokens * 2 * d * vocab + 4 * d * layers * 4 * pairs
    flops = training_step_flops(cfg, vocab, MASK_ID, torch.device("cpu"), 0, 1)
    assert flops.model == 3 * forward
