"""Import of the paper's released checkpoints (s-sahoo/Eso-LMs Lightning .ckpt) and export back.

The checkpoints here are synthetic but written like the released ones: torch.save of Lightning's
checkpoint dict, the DiT under ``backbone.`` with random weights and a non-trivial adaLN, an EMA
list that differs from the live weights, and ``hyper_parameters`` holding what Lightning's
save_hyperparameters keeps there: the run's OmegaConf DictConfig (with unresolved interpolations,
struct flag on) and the transformers GPT-2 tokenizer object (its class stood in for by a module
registered under transformers' name; its ``_tokenizer`` is a real ``tokenizers.Tokenizer``).
"""

from __future__ import annotations

import math
import subprocess
import sys
import types
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from esolm_dist.convert_cli import main
from esolm_dist.eso.rows import build_rows
from esolm_dist.inference.export_io import read_export, write_export
from esolm_dist.inference.model import EsoLM
from esolm_dist.reference.dit import reference_logits

VOCAB, HIDDEN, HEADS, LAYERS, FFN, COND, FREQUENCY, LENGTH = 258, 32, 4, 2, 128, 16, 256, 16
MASK = VOCAB - 1  # the reference appends the mask to the tokenizer's 257 ids, as to GPT-2's 50257
TOKENIZER_MODULE = "transformers.models.gpt2.tokenization_gpt2_fast"


# ---- a synthetic released checkpoint ----------------------------------------------------------------
def byte_level_tokenizer(extra_special: str, swap: bool = False) -> Tokenizer:
    """GPT-2's layout in small: 256 byte tokens, <|endoftext|> last of the BPE vocabulary, then one added
    token; ``swap`` exchanges the ids of the first two byte tokens."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if swap:
        alphabet[0], alphabet[1] = alphabet[1], alphabet[0]
    vocab = {token: i for i, token in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|endoftext|>", extra_special])
    return tokenizer


def reference_weights(seed: int) -> dict[str, torch.Tensor]:
    """EsoLMDiT state dict (models/dit.py names and registration order), random, adaLN far from identity."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std):
        return torch.randn(*shape, generator=g) * std

    head_dim = HIDDEN // HEADS
    w = {"vocab_embed.embedding": randn(VOCAB, HIDDEN, std=1.0),
         "sigma_map.mlp.0.weight": randn(COND, FREQUENCY, std=FREQUENCY ** -0.5),
         "sigma_map.mlp.0.bias": randn(COND, std=0.3), "sigma_map.mlp.2.weight": randn(COND, COND, std=COND ** -0.5),
         "sigma_map.mlp.2.bias": randn(COND, std=0.3),
         "rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)}
    for i in range(LAYERS):
        p = f"blocks.{i}."
        w.update({p + "norm1.weight": 1 + randn(HIDDEN, std=0.2),
                  p + "attn_qkv.weight": randn(3 * HIDDEN, HIDDEN, std=0.3),
                  p + "attn_out.weight": randn(HIDDEN, HIDDEN, std=HIDDEN ** -0.5),
                  p + "norm2.weight": 1 + randn(HIDDEN, std=0.2),
                  p + "mlp.0.weight": randn(FFN, HIDDEN, std=HIDDEN ** -0.5),
                  p + "mlp.0.bias": randn(FFN, std=0.1), p + "mlp.2.weight": randn(HIDDEN, FFN, std=FFN ** -0.5),
                  p + "mlp.2.bias": randn(HIDDEN, std=0.1),
                  p + "adaLN_modulation.weight": randn(6 * HIDDEN, COND, std=0.5 * COND ** -0.5),
                  p + "adaLN_modulation.bias": randn(6 * HIDDEN, std=0.4)})
    w.update({"output_layer.norm_final.weight": 1 + randn(HIDDEN, std=0.2),
              "output_layer.linear.weight": randn(VOCAB, HIDDEN, std=HIDDEN ** -0.5),
              "output_layer.linear.bias": randn(VOCAB, std=0.1),
              "output_layer.adaLN_modulation.weight": randn(2 * HIDDEN, COND, std=0.5 * COND ** -0.5),
              "output_layer.adaLN_modulation.bias": randn(2 * HIDDEN, std=0.4)})
    return w


def run_config(**algo):
    """The run's Hydra config as Lightning keeps it: a DictConfig, interpolations unresolved, struct on."""
    config = OmegaConf.create({
        "mode": "train", "seed": 1,
        "loader": {"global_batch_size": 512, "batch_size": "${div_up:${.global_batch_size}, 8}"},
        "model": {"name": "small", "type": "ddit", "hidden_size": HIDDEN, "cond_dim": COND, "length": LENGTH,
                  "n_blocks": LAYERS, "n_heads": HEADS, "scale_by_sigma": True, "dropout": 0.1,
                  "tie_word_embeddings": False},
        "algo": {"name": "esolm", "backbone": "esolm_dit", "parameterization": "subs", "time_conditioning": False,
                 "T": 0, "causal_attention": False, "alpha_0": 0.125, "batch_split": 0.5, "diffusion_shuffle": True,
                 "diffusion_attn_mode": "causal", "sequential_shuffle": True, "sequential_attn_mode": "causal",
                 "loss_type": "elbo", **algo},
        "training": {"ema": 0.9999, "sampling_eps": 1e-3},
        "wandb": {"tags": ["${noise.type}", "${algo.name}"]}, "noise": {"type": "log-linear"},
    })
    OmegaConf.set_struct(config, True)
    return config


def gpt2_tokenizer_object():
    """A transformers GPT2TokenizerFast as pickled: its attributes, with the tokenizers.Tokenizer the
    reference trained with (GPT-2 + an added [PAD] at the id the model uses for the mask)."""
    cls = sys.modules[TOKENIZER_MODULE].GPT2TokenizerFast
    tokenizer = cls.__new__(cls)
    eos = AddedToken("<|endoftext|>", special=True)
    tokenizer.__dict__.update({
        "_tokenizer": byte_level_tokenizer("[PAD]"), "name_or_path": "gpt2", "model_max_length": 1024,
        "padding_side": "right", "truncation_side": "right", "model_input_names": ["input_ids", "attention_mask"],
        "init_kwargs": {"add_prefix_space": False, "bos_token": eos, "eos_token": eos, "unk_token": eos,
                        "added_tokens_decoder": {VOCAB - 2: eos}},
        "_special_tokens_map": {"bos_token": eos, "eos_token": eos, "unk_token": eos, "pad_token": "[PAD]"},
        "clean_up_tokenization_spaces": False, "_decode_use_source_tokenizer": False})
    return tokenizer


@pytest.fixture(scope="module")
def transformers_stand_in():
    """transformers is not installed here: a module under its name holds the tokenizer class, so pickle
    writes the same global as the released files."""
    with pytest.MonkeyPatch.context() as mp:
        parts = TOKENIZER_MODULE.split(".")
        for i in range(1, len(parts) + 1):
            mp.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        cls = type("GPT2TokenizerFast", (), {"__module__": TOKENIZER_MODULE})
        sys.modules[TOKENIZER_MODULE].GPT2TokenizerFast = cls
        yield


def save_reference(path, live, ema=None, config=None, tokenizer=None, **algo):
    """torch.save of a Lightning checkpoint dict shaped like s-sahoo/Eso-LMs'; the EMA list follows the
    backbone's parameters (the state dict's order without the rotary buffer)."""
    names = [name for name in live if name != "rotary_emb.inv_freq"]
    adam = {i: {"step": torch.tensor(5.0), "exp_avg": torch.zeros_like(live[n]),
                "exp_avg_sq": torch.zeros_like(live[n])} for i, n in enumerate(names[:3])}
    checkpoint = {
        "epoch": 3, "global_step": 250000, "pytorch-lightning_version": "2.5.0.post0",
        "state_dict": OrderedDict(("backbone." + k, v) for k, v in live.items()),
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 4, "completed": 3},
                                                                    "current": {"ready": 4, "completed": 3}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'val/nll', 'mode': 'min'}": {
            "monitor": "val/nll", "best_model_score": torch.tensor(3.2), "best_model_path": "/ckpt/best.ckpt",
            "best_k_models": {"/ckpt/best.ckpt": torch.tensor(3.2)}, "kth_value": torch.tensor(math.inf)}},
        "optimizer_states": [{"state": adam, "param_groups": [
            {"lr": 3e-4, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "foreach": None,
             "maximize": False, "capturable": False, "differentiable": False, "fused": None, "params": [0, 1, 2]}]}],
        "lr_schedulers": [{"base_lrs": [3e-4], "last_epoch": 5, "_step_count": 6, "_last_lr": [3e-4],
                           "lr_lambdas": [{}]}],
        "hparams_name": "kwargs",
        "hyper_parameters": {"config": config if config is not None else run_config(**algo),
                             "tokenizer": tokenizer if tokenizer is not None else gpt2_tokenizer_object()},
        "ema": {"decay": 0.9999, "num_updates": 5, "shadow_params": [ema[n] for n in names]} if ema else None,
        "sampler": {"random_state": None},
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def released(transformers_stand_in, tmp_path_factory):
    """Checkpoints of Eso-LM (B) (diffusion_attn_mode causal) and (A) (mixed2), live and EMA weights, and
    the tokenizer file a user passes (the checkpoint's vocabulary with [MASK] appended)."""
    root = tmp_path_factory.mktemp("released")
    byte_level_tokenizer("[MASK]").save(str(root / "gpt2-mask.json"))
    live = reference_weights(0)
    ema = {name: tensor + 0.05 * torch.randn_like(tensor) for name, tensor in live.items()}
    return {"tokenizer": root / "gpt2-mask.json", "live": live, "ema": ema,
            "B": save_reference(root / "esolmb.ckpt", live, ema),
            "A": save_reference(root / "esolma.ckpt", live, ema, diffusion_attn_mode="mixed2", alpha_0=1.0,
                                batch_split=1.0)}


def convert(*args) -> int:
    return main([str(a) for a in args])


def sorted_rows(variant: str, seed: int):
    """Random clean sequences, sorted into Eso-LM orders: diffusion and sequential rows of 2L tokens."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (4, LENGTH), generator=gen)
    return build_rows(x, alpha0=0.5, kappa=0.5, variant=variant, loss_type="elbo", eps=1e-3, mask_id=MASK,
                      generator=gen)


def max_logit_difference(model: EsoLM, weights: dict[str, torch.Tensor], variant: str, seed: int = 1) -> float:
    rows = sorted_rows(variant, seed)
    allowed = rows.masks.dense()[:, 0]
    with torch.no_grad():
        got = model(rows.tokens, rows.positions, attn_mask=allowed)
        expected = reference_logits(weights, HEADS, rows.tokens, rows.positions, allowed)
    return float((got[..., :MASK] - expected[..., :MASK]).abs().max())


# ---- the import -----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["B", "A"])
@pytest.mark.parametrize("ema", [False, True], ids=["live", "ema"])
def test_import_equals_the_unfolded_adaln_network(released, tmp_path, capsys, variant, ema):
    out = tmp_path / "export"
    assert convert("import", "--reference", released[variant], "--out", out, "--tokenizer", released["tokenizer"],
                   *(["--ema"] if ema else []), "--verify") == 0
    printed = capsys.readouterr().out
    assert "verified against the unfolded adaLN network" in printed
    assert "257 text-token ids match the tokenizer stored in the checkpoint" in printed
    model = EsoLM.from_pretrained(out)
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_layers, config.num_heads, config.ffn_hidden_size) == (
        VOCAB, HIDDEN, LAYERS, HEADS, FFN)
    assert (config.mask_token_id, config.eos_token_id, config.max_seq_len) == (MASK, MASK - 1, LENGTH)
    assert (config.variant, config.alpha0) == (variant, {"B": 0.125, "A": 1.0}[variant])
    used, other = (released["ema"], released["live"]) if ema else (released["live"], released["ema"])
    assert max_logit_difference(model, used, variant) < 1e-5
    assert max_logit_difference(model, other, variant) > 1e-2  # --ema picks the shadow weights, not the live ones


def test_fold_follows_the_reference_block_definition(released, tmp_path):
    """One token, so attention returns its own value vector: the whole DiT written out by hand from
    models/dit.py (adaLN chunks shift, scale, gate; modulate x * (1 + scale) + shift; gated residuals)."""
    out = tmp_path / "export"
    assert convert("import", "--reference", released["B"], "--out", out, "--tokenizer", released["tokenizer"]) == 0
    w = {k: v.double() for k, v in released["live"].items()}
    t_emb = torch.cat([torch.ones(FREQUENCY // 2), torch.zeros(FREQUENCY // 2)]).double()
    c = F.silu(w["sigma_map.mlp.2.weight"] @ F.silu(w["sigma_map.mlp.0.weight"] @ t_emb + w["sigma_map.mlp.0.bias"])
               + w["sigma_map.mlp.2.bias"])

    def norm(v):
        return (v - v.mean()) / torch.sqrt(v.var(unbiased=False) + 1e-5)

    token = 7
    x = w["vocab_embed.embedding"][token]
    for i in range(LAYERS):
        p = f"blocks.{i}."
        m = w[p + "adaLN_modulation.weight"] @ c + w[p + "adaLN_modulation.bias"]
        shift_msa, scale_msa, gate_msa = m[:HIDDEN], m[HIDDEN:2 * HIDDEN], m[2 * HIDDEN:3 * HIDDEN]
        shift_mlp, scale_mlp, gate_mlp = m[3 * HIDDEN:4 * HIDDEN], m[4 * HIDDEN:5 * HIDDEN], m[5 * HIDDEN:]
        h = norm(x) * w[p + "norm1.weight"] * (1 + scale_msa) + shift_msa
        value = w[p + "attn_qkv.weight"][2 * HIDDEN:] @ h
        x = x + gate_msa * (w[p + "attn_out.weight"] @ value)
        h = norm(x) * w[p + "norm2.weight"] * (1 + scale_mlp) + shift_mlp
        h = F.gelu(w[p + "mlp.0.weight"] @ h + w[p + "mlp.0.bias"], approximate="tanh")
        x = x + gate_mlp * (w[p + "mlp.2.weight"] @ h + w[p + "mlp.2.bias"])
    m = w["output_layer.adaLN_modulation.weight"] @ c + w["output_layer.adaLN_modulation.bias"]
    h = norm(x) * w["output_layer.norm_final.weight"] * (1 + m[HIDDEN:]) + m[:HIDDEN]
    expected = (w["output_layer.linear.weight"] @ h + w["output_layer.linear.bias"])[:MASK]
    tokens, positions = torch.tensor([[token]]), torch.tensor([[5]])
    with torch.no_grad():
        got = EsoLM.from_pretrained(out)(tokens, positions)[0, 0, :MASK]
        unfolded = reference_logits(released["live"], HEADS, tokens, positions, torch.ones(1, 1, 1, dtype=torch.bool))
    assert float((got.double() - expected).abs().max()) < 1e-5
    assert float((unfolded[0, 0, :MASK].double() - expected).abs().max()) < 1e-5


def test_the_import_samples_scores_and_fine_tunes(released, tmp_path, capsys):
    """An import is an ordinary export: esolm-sample draws from it, esolm-likelihood scores it, and a
    training run starts from it (train.init_from) with the paper's network: same logits."""
    from conftest import TINY_TRAINING

    from esolm_dist.config import load_config
    from esolm_dist.inference.cli import main as sample
    from esolm_dist.inference.likelihood import main as likelihood
    from esolm_dist.train import Trainer

    out = tmp_path / "export"
    assert convert("import", "--reference", released["B"], "--out", out, "--tokenizer", released["tokenizer"]) == 0
    assert sample(["--model", str(out), "--num-samples", "2", "--length", str(LENGTH), "--steps", "4"]) == 0
    cfg = load_config(None, [*TINY_TRAINING, f"train.run_dir={tmp_path / 'run'}", f"data.shard_dir={tmp_path / 'shards'}",
                             f"logging.mlflow_uri=sqlite:///{tmp_path}/mlflow.db", f"data.tokenizer={out}/tokenizer.json",
                             f"model.hidden_size={HIDDEN}", f"model.num_heads={HEADS}", f"model.num_layers={LAYERS}",
                             f"model.seq_len={LENGTH}", "eso.alpha0=0.125", f"train.init_from={out}",
                             "train.max_steps=1"])
    trainer = Trainer(cfg)
    rows = sorted_rows("B", seed=3)
    with torch.no_grad():
        network = trainer.network.eval()
        got = network(rows.tokens, rows.positions, rows.masks)[..., :MASK]
        expected = reference_logits(released["live"], HEADS, rows.tokens, rows.positions, rows.masks.dense()[:, 0])
    assert float((got - expected[..., :MASK]).abs().max()) < 1e-5
    network.train()
    trainer.fit()
    assert likelihood(["--model", str(out), "--shards", str(tmp_path / "shards"), "--orders", "2", "--batches", "1",
                       "--batch-size", "2"]) == 0
    assert "esolm-likelihood: K=2 alpha0=0.125: -log p(x) <=" in capsys.readouterr().out


# ---- the way back ---------------------------------------------------------------------------------
def test_reference_export_round_trips_bitwise(released, tmp_path):
    """export --format reference writes plain data the reference code's load_from_checkpoint reads
    (state_dict of EsoLMDiT, ema, fit-loop counters); importing it gives back the same export, bit for bit."""
    first, ckpt, second = tmp_path / "first", tmp_path / "paper.ckpt", tmp_path / "second"
    assert convert("import", "--reference", released["A"], "--out", first, "--tokenizer", released["tokenizer"],
                   "--ema") == 0
    assert convert("export", "--checkpoint", first, "--out", ckpt, "--format", "reference") == 0
    written = torch.load(ckpt, weights_only=True)  # no allowlist needed
    state = written["state_dict"]
    assert list(state) == ["backbone." + name for name in released["live"]]  # EsoLMDiT's state-dict order
    names = [name for name in released["live"] if name != "rotary_emb.inv_freq"]
    shadow = written["ema"]["shadow_params"]
    assert all(torch.equal(a, state["backbone." + n]) for a, n in zip(shadow, names, strict=True))
    assert torch.equal(state["backbone.rotary_emb.inv_freq"], released["live"]["rotary_emb.inv_freq"])
    assert written["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 0
    assert written["hyper_parameters"]["config"]["algo"]["diffusion_attn_mode"] == "mixed2"
    backbone = {k[len("backbone."):]: v for k, v in state.items()}
    assert max_logit_difference(EsoLM.from_pretrained(first), backbone, "A") < 1e-5
    assert convert("import", "--reference", ckpt, "--out", second, "--tokenizer", released["tokenizer"]) == 0
    a, b = read_export(first), read_export(second)
    assert a.config == b.config
    assert a.state_dict.keys() == b.state_dict.keys()
    for name, tensor in a.state_dict.items():
        assert torch.equal(tensor, b.state_dict[name]), name


def test_a_model_with_an_attention_output_bias_has_no_reference_form(released, tmp_path, capsys):
    imported = read_export(_import(released, tmp_path))
    weights = dict(imported.state_dict)
    weights["blocks.1.attn.out.bias"] = torch.full((HIDDEN,), 0.01)
    biased = write_export(tmp_path / "biased", imported.config, weights, imported.path / "tokenizer.json", "card")
    assert convert("export", "--checkpoint", biased, "--out", tmp_path / "x.ckpt", "--format", "reference") == 2
    assert_one_line(capsys, "blocks.1.attn.out.bias is nonzero (max |b| = 1.00e-02): the reference block has no "
                            "attention-output bias")
    assert not (tmp_path / "x.ckpt").exists()


# ---- what is refused ------------------------------------------------------------------------------
def _import(released, tmp_path, reference=None, *flags, tokenizer=None):
    out = tmp_path / "export"
    code = convert("import", "--reference", reference or released["B"], "--out", out, "--tokenizer",
                   tokenizer or released["tokenizer"], *flags)
    return out if code == 0 else code


def assert_one_line(capsys, expected: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("esolm-convert: error:") and "\n" not in err, err
    assert expected in err, err


class RunsCode:
    """A pickled object whose rebuilding would run a program (what an attacker's .ckpt holds)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return subprocess.call, (["touch", str(self.marker)],)


def test_truncated_foreign_and_unsafe_files_get_one_line(released, tmp_path, capsys):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(released["B"].read_bytes()[:50_000])
    assert _import(released, tmp_path, truncated) == 2
    assert_one_line(capsys, "truncated.ckpt is not a PyTorch zip checkpoint (truncated, or another format)")

    text = tmp_path / "config.json"
    text.write_text('{"not": "a checkpoint"}')
    assert _import(released, tmp_path, text) == 2
    assert_one_line(capsys, "config.json is not a PyTorch zip checkpoint")

    foreign = tmp_path / "model_states.pt"
    torch.save({"module": {"network.embedding.word.weight": torch.zeros(2, 2)}}, foreign)
    assert _import(released, tmp_path, foreign) == 2
    assert_one_line(capsys, "model_states.pt is not an Eso-LM Lightning checkpoint (no state_dict with backbone.*")

    marker = tmp_path / "pwned"
    unsafe = tmp_path / "unsafe.ckpt"
    save_reference(unsafe, released["live"], tokenizer=RunsCode(marker))
    assert _import(released, tmp_path, unsafe) == 2
    assert_one_line(capsys, "refusing to load")
    assert not marker.exists()
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("algo, expected", [
    ({"time_conditioning": True}, "algo.time_conditioning is on: adaLN then depends on t"),
    ({"backbone": "dit"}, "algo.backbone is 'dit'; only the Eso-LM DiT (esolm_dit) can be imported"),
    ({"diffusion_attn_mode": "bidirectional"}, "algo.diffusion_attn_mode is 'bidirectional'"),
    ({"alpha_0": "${eval:1/8}"}, "the stored config has no usable algo.alpha_0 ('${eval:1/8}'); pass --alpha0"),
])
def test_unsupported_runs_get_one_line(released, tmp_path, capsys, algo, expected):
    ckpt = save_reference(tmp_path / "other.ckpt", released["live"], **algo)
    assert _import(released, tmp_path, ckpt) == 2
    assert_one_line(capsys, expected)


def test_flags_stand_in_for_a_missing_config(released, tmp_path, capsys):
    ckpt = save_reference(tmp_path / "bare.ckpt", released["live"], config={})
    assert _import(released, tmp_path, ckpt) == 2
    assert_one_line(capsys, "the stored config has no usable algo.alpha_0 (None); pass --alpha0")
    flags = ["--alpha0", "0.25", "--variant", "A", "--num-heads", str(HEADS), "--seq-len", "32"]
    config = read_export(_import(released, tmp_path, ckpt, *flags, "--verify")).config
    assert (config.alpha0, config.variant, config.num_heads, config.max_seq_len) == (0.25, "A", HEADS, 32)


def test_other_dimensions_and_missing_ema_get_one_line(released, tmp_path, capsys):
    assert _import(released, tmp_path, None, "--num-heads", "3") == 2
    assert_one_line(capsys, "hidden size 32 is not an even multiple of 3 heads; pass the right --num-heads")
    assert _import(released, tmp_path, None, "--num-heads", "8") == 2
    assert_one_line(capsys, "rotary_emb.inv_freq is not the base-10000 rotary of head dim 4")
    no_ema = save_reference(tmp_path / "no_ema.ckpt", released["live"])
    assert _import(released, tmp_path, no_ema, "--ema") == 2
    assert_one_line(capsys, "no_ema.ckpt has no EMA weights (ema.shadow_params); import without --ema")
    short = {k: v for k, v in released["live"].items() if not k.startswith("blocks.1.")}
    assert _import(released, tmp_path, save_reference(tmp_path / "short.ckpt", short)) == 2
    assert_one_line(capsys, "config model.n_blocks = 2 but the weights have 1")


def test_the_tokenizer_must_be_the_checkpoints(released, tmp_path, capsys):
    without_mask = tmp_path / "gpt2.json"
    byte_level_tokenizer("<|endoftext|>").save(str(without_mask))
    assert _import(released, tmp_path, None, tokenizer=without_mask) == 2
    assert_one_line(capsys, "gpt2.json: tokenizer lacks special token(s) [MASK]")

    other = byte_level_tokenizer("[MASK]")
    other.add_special_tokens(["<|pad|>"])
    other.save(str(tmp_path / "longer.json"))
    assert _import(released, tmp_path, None, tokenizer=tmp_path / "longer.json") == 2
    assert_one_line(capsys, "longer.json: 259 tokens with [MASK] at id 257, the checkpoint has 258 token ids with "
                            "the mask at 257")

    byte_level_tokenizer("[MASK]", swap=True).save(str(tmp_path / "shuffled.json"))
    assert _import(released, tmp_path, None, tokenizer=tmp_path / "shuffled.json") == 2
    assert_one_line(capsys, "shuffled.json: token ids differ from the tokenizer stored in the checkpoint (first: ")
