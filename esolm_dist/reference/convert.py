"""``esolm-convert import``: a released Eso-LM checkpoint -> an ordinary export folder; and the way
back (``esolm-convert export --format reference``): an export -> a Lightning checkpoint the
reference code loads.

The network's shape comes from the weights (vocabulary, hidden size, layers, FFN, cond size); the
head count, L, variant and alpha_0 from the stored run config (``model.n_heads``, ``model.length``,
``algo.diffusion_attn_mode``: ``causal`` = Eso-LM (B), ``mixed2`` = (A), ``algo.alpha_0``), each
overridable by a flag. The mask is the last token id (the reference appends it to GPT-2's 50257).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from esolm_dist.errors import CheckpointError
from esolm_dist.inference.export_io import ExportConfig, ExportError, write_export
from esolm_dist.reference import dit, lightning_file

VARIANT_OF_MODE = {"causal": "B", "mixed2": "A"}  # algo.diffusion_attn_mode
MODE_OF_VARIANT = {variant: mode for mode, variant in VARIANT_OF_MODE.items()}
SEQUENTIAL_MODE = {"B": "causal", "A": "mixed"}  # algo.sequential_attn_mode of our variants


@dataclass(frozen=True)
class Settings:
    """What the weights do not say, from the run config or the flags."""

    num_heads: int
    seq_len: int
    variant: str
    alpha0: float


def run_import(args: argparse.Namespace) -> Path:
    """`esolm-convert import` (its arguments: esolm_dist.convert_cli)."""
    overrides = {"num_heads": args.num_heads, "seq_len": args.seq_len, "variant": args.variant, "alpha0": args.alpha0}
    return import_reference(args.reference, args.out, args.tokenizer, args.ema, args.verify, args.overwrite,
                            **overrides)


def _setting(config: dict, section: str, key: str, flag: str, path: Path, override):
    if override is not None:
        return override
    value = (config.get(section) or {}).get(key)
    if value is None or (isinstance(value, str) and value.startswith(("${", "???"))):
        raise CheckpointError(f"{path}: the stored config has no usable {section}.{key} ({value!r}); pass {flag}")
    return value


def settings(config: dict, path: Path, num_heads=None, seq_len=None, variant=None, alpha0=None) -> Settings:
    """Head count, L, variant and alpha_0; time conditioning and other backbones are refused."""
    algo = config.get("algo") or {}
    if algo.get("backbone", "esolm_dit") != "esolm_dit":
        raise CheckpointError(f"{path}: algo.backbone is {algo['backbone']!r}; only the Eso-LM DiT (esolm_dit) "
                              "can be imported")
    if algo.get("time_conditioning"):
        raise CheckpointError(f"{path}: algo.time_conditioning is on: adaLN then depends on t and does not fold "
                              "into a plain transformer; only Eso-LMs (sigma = 0) can be imported")
    alpha0 = float(_setting(config, "algo", "alpha_0", "--alpha0", path, alpha0))
    if variant is None:
        mode = _setting(config, "algo", "diffusion_attn_mode", "--variant", path, None)
        if mode not in VARIANT_OF_MODE:
            raise CheckpointError(f"{path}: algo.diffusion_attn_mode is {mode!r}; Eso-LM (B) trains with 'causal' and "
                                  "(A) with 'mixed2': pass --variant A or B to import it anyway")
        variant = VARIANT_OF_MODE[mode]
        sequential = algo.get("sequential_attn_mode", SEQUENTIAL_MODE[variant])
        if alpha0 < 1 and sequential != SEQUENTIAL_MODE[variant]:
            raise CheckpointError(f"{path}: algo.sequential_attn_mode is {sequential!r}, our Eso-LM ({variant}) uses "
                                  f"{SEQUENTIAL_MODE[variant]!r} in its sequential phase; pass --variant to import it "
                                  "anyway")
    return Settings(int(_setting(config, "model", "n_heads", "--num-heads", path, num_heads)),
                    int(_setting(config, "model", "length", "--seq-len", path, seq_len)), variant, alpha0)


def _shape_of(weights: dict[str, torch.Tensor], path: Path) -> dict[str, int]:
    """Vocabulary, hidden, layers, FFN, cond and sinusoid sizes read off the weights, then every
    tensor checked against the DiT's names and shapes."""
    try:
        vocab, hidden = weights["vocab_embed.embedding"].shape
        shape = {"vocab": vocab, "hidden": hidden, "ffn": weights["blocks.0.mlp.0.weight"].shape[0],
                 "num_layers": len({k.split(".")[1] for k in weights if k.startswith("blocks.")}),
                 "cond": weights["sigma_map.mlp.2.weight"].shape[0],
                 "frequency": weights["sigma_map.mlp.0.weight"].shape[1]}
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: the backbone is not an Eso-LM DiT (no vocab_embed / sigma_map / adaLN "
                              "blocks); only EsoLMDiT checkpoints can be imported") from None
    expected = dit.expected_shapes(**shape)
    expected[dit.ROTARY_BUFFER] = weights.get(dit.ROTARY_BUFFER, torch.empty(0)).shape
    wrong = sorted(set(expected) ^ set(weights)) or [k for k, s in expected.items() if tuple(weights[k].shape) != s]
    if wrong:
        raise CheckpointError(f"{path}: backbone tensors {wrong[:3]} do not fit an Eso-LM DiT of {shape}; only "
                              "EsoLMDiT checkpoints can be imported")
    return shape


def _ema_weights(checkpoint: dict, live: dict[str, torch.Tensor], num_layers: int, path: Path):
    shadow = (checkpoint.get("ema") or {}).get("shadow_params")
    names = dit.parameter_names(num_layers)
    if not isinstance(shadow, list) or not shadow:
        raise CheckpointError(f"{path} has no EMA weights (ema.shadow_params); import without --ema")
    if len(shadow) != len(names) or any(s.shape != live[n].shape for s, n in zip(shadow, names, strict=False)):
        raise CheckpointError(f"{path}: ema.shadow_params holds {len(shadow)} tensors that do not follow the "
                              f"backbone's {len(names)} parameters; import without --ema")
    return {**live, **dict(zip(names, shadow, strict=True))}


def _check_tokenizer(tokenizer_path: str | Path, checkpoint: dict, vocab: int):
    """The tokenizer has the checkpoint's vocab size, [MASK] last, and, when the checkpoint stores its
    training tokenizer, the same token ids."""
    from esolm_dist.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)
    if (tokenizer.vocab_size, tokenizer.mask_id) != (vocab, vocab - 1):
        raise ExportError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens with [MASK] at id {tokenizer.mask_id}, the "
                          f"checkpoint has {vocab} token ids with the mask at {vocab - 1}; pass its tokenizer with "
                          "[MASK] appended (README: 'Import the paper's checkpoints')")
    stored = lightning_file.stored_vocabulary(checkpoint)
    if stored is None:
        return tokenizer, "the checkpoint stores no tokenizer vocabulary: checked its size and the mask id"
    given = json.loads(tokenizer.path.read_text())["model"]["vocab"]
    text_ids = vocab - 1
    theirs = {token: i for token, i in stored.items() if i < text_ids}
    ours = {token: i for token, i in given.items() if i < text_ids}
    if theirs != ours:
        token = next(iter(sorted(set(theirs.items()) ^ set(ours.items()), key=lambda item: item[1])))
        raise ExportError(f"{tokenizer.path}: token ids differ from the tokenizer stored in the checkpoint (first: "
                          f"{token[0]!r} id {token[1]}); pass the tokenizer the model was trained with")
    return tokenizer, f"the tokenizer's {text_ids} text-token ids match the tokenizer stored in the checkpoint"


def _check_dimensions(shape: dict[str, int], config: dict, given: Settings, weights: dict[str, torch.Tensor],
                      path: Path) -> None:
    """The stored config agrees with the weights, and the head count with the rotary buffer."""
    stored = config.get("model") or {}
    for key, ours in (("hidden_size", shape["hidden"]), ("n_blocks", shape["num_layers"]), ("cond_dim", shape["cond"])):
        if isinstance(stored.get(key), int) and stored[key] != ours:
            raise CheckpointError(f"{path}: config model.{key} = {stored[key]} but the weights have {ours}; the "
                                  "checkpoint is inconsistent")
    if given.num_heads < 1 or shape["hidden"] % (2 * given.num_heads):
        raise CheckpointError(f"{path}: hidden size {shape['hidden']} is not an even multiple of {given.num_heads} "
                              "heads; pass the right --num-heads")
    head_dim = shape["hidden"] // given.num_heads
    rotary = weights[dit.ROTARY_BUFFER].float()
    if rotary.shape != (head_dim // 2,) or not torch.allclose(rotary, dit.rotary_frequencies(head_dim)):
        raise CheckpointError(f"{path}: rotary_emb.inv_freq is not the base-10000 rotary of head dim {head_dim}; "
                              "check --num-heads")


def _model_card(path: Path, checkpoint: dict, use_ema: bool, shape: dict[str, int], given: Settings) -> str:
    return (f"# Eso-LM export\n\nImported from the reference checkpoint `{path}` (s-sahoo/Eso-LMs, global step "
            f"{checkpoint.get('global_step', 'unknown')}, {'EMA' if use_ema else 'live'} weights). Its adaLN "
            "(sigma = 0) is folded into the LayerNorm affine parameters and the residual gates into the "
            f"attention-output and MLP-output weights.\n\nEso-LM ({given.variant}), alpha0 = {given.alpha0}, "
            f"{shape['num_layers']} layers x {shape['hidden']} hidden, {given.num_heads} heads, L = {given.seq_len}."
            "\n\nSample: `esolm-sample --model THIS_FOLDER --num-samples 4 --length 128`.\n")


def import_reference(reference: str | Path, out: str | Path, tokenizer_path: str | Path, use_ema: bool = False,
                     verify: bool = False, overwrite: bool = False, **overrides) -> Path:
    """Read and check the checkpoint and the tokenizer, fold, write the export (atomically), verify."""
    path = Path(reference)
    checkpoint = lightning_file.load_lightning_checkpoint(path)
    weights = lightning_file.backbone_weights(checkpoint)
    shape = _shape_of(weights, path)
    config = lightning_file.run_config(checkpoint, path)
    given = settings(config, path, **overrides)
    _check_dimensions(shape, config, given, weights, path)
    if use_ema:
        weights = _ema_weights(checkpoint, weights, shape["num_layers"], path)
    tokenizer, tokenizer_note = _check_tokenizer(tokenizer_path, checkpoint, shape["vocab"])
    export_config = ExportConfig.from_dict({
        "format": "esolm-export-v1", "vocab_size": shape["vocab"], "hidden_size": shape["hidden"],
        "num_layers": shape["num_layers"], "num_heads": given.num_heads, "ffn_hidden_size": shape["ffn"],
        "rotary_base": dit.ROTARY_BASE, "layernorm_eps": dit.LAYERNORM_EPS, "mask_token_id": shape["vocab"] - 1,
        "eos_token_id": tokenizer.eos_id, "max_seq_len": given.seq_len, "variant": given.variant,
        "alpha0": given.alpha0, "dtype": "float32"}, f"the settings of {path}")
    written = write_export(out, export_config, dit.fold(weights, shape["num_layers"]), tokenizer.path,
                           _model_card(path, checkpoint, use_ema, shape, given), overwrite=overwrite)
    print(f"esolm-convert: {tokenizer_note}")
    if verify:
        difference = verify_import(written, weights, given.num_heads)
        print(f"esolm-convert: verified against the unfolded adaLN network: max |logit difference| = {difference:.2e}")
    return written


def verify_import(path: Path, backbone: dict[str, torch.Tensor], num_heads: int, tolerance: float = 1e-5,
                  max_len: int = 256) -> float:
    """fp32 logits of the export (plain-torch EsoLM) against the unfolded reference network on the same
    random sorted rows, diffusion and sequential, every logit but the mask's. Returns the largest
    absolute difference."""
    from esolm_dist.eso.rows import build_rows
    from esolm_dist.inference.model import EsoLM

    model = EsoLM.from_pretrained(path, dtype=torch.float32)
    config = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.mask_token_id, (4, min(config.max_seq_len, max_len)), generator=gen)
    rows = build_rows(x, alpha0=0.5, kappa=0.5, variant=config.variant, loss_type="elbo", eps=1e-3,
                      mask_id=config.mask_token_id, generator=gen)
    allowed = rows.masks.dense()[:, 0]
    with torch.no_grad():
        expected = dit.reference_logits({k: v.float() for k, v in backbone.items()}, num_heads, rows.tokens,
                                        rows.positions, allowed)
        got = model(rows.tokens, rows.positions, attn_mask=allowed)
    keep = torch.ones(config.vocab_size, dtype=torch.bool)
    keep[config.mask_token_id] = False
    difference = float((expected[..., keep] - got[..., keep]).abs().max())
    if not difference <= tolerance:
        raise ExportError(f"{path}: the import's logits differ from the unfolded reference network's by "
                          f"{difference:.2e} (> {tolerance}); the import is wrong: report a bug")
    return difference


def write_reference(out: str | Path, config: ExportConfig, weights: dict[str, torch.Tensor],
                    num_tokenizer_tokens: int, overwrite: bool = False) -> Path:
    """An export's weights (reference layout) -> a Lightning checkpoint of the reference DiT, identity adaLN."""
    if config.mask_token_id != num_tokenizer_tokens - 1:
        raise ExportError(f"the model's mask id is {config.mask_token_id} of {num_tokenizer_tokens} tokenizer ids; "
                          "the reference code appends the mask as the last id, so this model has no reference form")
    for i in range(config.num_layers):
        bias = weights[f"blocks.{i}.attn.out.bias"]
        if bias.abs().max() > 0:
            raise ExportError(f"blocks.{i}.attn.out.bias is nonzero (max |b| = {float(bias.abs().max()):.2e}): the "
                              "reference block has no attention-output bias, so this model has no exact reference "
                              "form; only models whose attention-output bias is zero (imported ones) can be exported")
    vocab = config.mask_token_id + 1  # rows past the tokenizer's are padding, never predicted
    ours = {name: tensor.float() for name, tensor in weights.items()}
    ours.update({name: ours[name][:vocab] for name in ("embed.weight", "head.weight", "head.bias")})
    backbone = dit.unfold(ours, config.num_layers, config.num_heads)
    run = {"model": {"hidden_size": config.hidden_size, "n_heads": config.num_heads, "n_blocks": config.num_layers,
                     "length": config.max_seq_len, "cond_dim": dit.COND_DIM},
           "algo": {"name": "esolm", "backbone": "esolm_dit", "time_conditioning": False, "alpha_0": config.alpha0,
                    "diffusion_attn_mode": MODE_OF_VARIANT[config.variant],
                    "sequential_attn_mode": SEQUENTIAL_MODE[config.variant]}}
    names = dit.parameter_names(config.num_layers)
    return lightning_file.write_lightning_checkpoint(out, backbone, names, run, overwrite)
