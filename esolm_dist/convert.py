"""``python tools/convert.py export`` (command line: esolm_dist.convert_cli): a training checkpoint -> one
self-contained export folder.

The export (safetensors weights in the reference layout of design.md, config.json, the
tokenizer, a model card) loads with plain torch for single-GPU KV-cached sampling
(esolm_dist.inference). The checkpoint is read offline, on one process
(esolm_dist.checkpoint_reader) and put in the reference layout (esolm_dist.weight_layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from esolm_dist.checkpoint_reader import read_checkpoint_weights, resolve_checkpoint
from esolm_dist.inference.export_io import ExportError, export_config, training_run_card_line, write_export
from esolm_dist.weight_layout import to_reference_layout

VERIFY_TOLERANCE = 1e-5  # max |logit difference| between the export and the training network (fp32 logits)


def model_card(meta: dict, directory: Path, use_ema: bool) -> str:
    cfg = meta["config"]
    val_nelbo = meta.get("val_nelbo")
    return (f"# Eso-LM export\n\nFrom `{directory}` (step {meta['step']}, {'EMA' if use_ema else 'live'} weights, "
            f"trained with layout {meta['layout']}).\n\nEso-LM ({cfg['eso']['variant']}), alpha0 = "
            f"{cfg['eso']['alpha0']}, {cfg['model']['num_layers']} layers x {cfg['model']['hidden_size']} hidden, "
            f"L = {cfg['model']['seq_len']}. Last validation NELBO/token: "
            f"{'not recorded' if val_nelbo is None else f'{val_nelbo:.4f}'}.\n\n"
            + (f"{training_run_card_line(meta['mlflow_run_id'], cfg['logging']['mlflow_uri'])}\n\n"
               if meta.get("mlflow_run_id") else "")
            + "Sample: `esolm-sample --model THIS_FOLDER --num-samples 4 --length 128`.\n\n## Training config\n\n```json\n"
            + json.dumps(cfg, indent=2) + "\n```\n")


def export(checkpoint: str | Path, out: str | Path, use_ema: bool = False, dtype: str = "fp32",
           verify: bool = False, overwrite: bool = False, format: str = "export") -> Path:
    from esolm_dist.data.tokenizer import load_tokenizer

    if format == "reference":
        if verify or dtype != "fp32":
            raise ExportError("--verify and --dtype apply to export folders; --format reference writes fp32 "
                              "(check it with `esolm-convert import --verify`)")
        return export_reference(checkpoint, out, use_ema, overwrite)
    directory = resolve_checkpoint(checkpoint)
    meta, network = read_checkpoint_weights(directory, use_ema)
    tokenizer_name = meta["config"]["data"]["tokenizer"]
    tokenizer = load_tokenizer(None if tokenizer_name == "bundled" else tokenizer_name)
    weights = to_reference_layout(network, meta["config"]["model"]["num_heads"])
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    config = export_config(meta, weights, tokenizer, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    path = write_export(out, config, {k: v.to(torch_dtype) for k, v in weights.items()}, tokenizer.path,
                        model_card(meta, directory, use_ema), overwrite=overwrite)
    if verify:
        difference = verify_export(path, meta, network, torch_dtype)
        passed = difference <= VERIFY_TOLERANCE
        verdict = (f"verify: max |logit difference| {difference:.1e} {'<=' if passed else '>'} tolerance "
                   f"{VERIFY_TOLERANCE:g}")
        if not passed:
            raise ExportError(f"{verdict}: FAIL; the export in {path} does not match its checkpoint: report a bug")
        print(f"esolm-convert: {verdict}: PASS")
    return path


def export_reference(source: str | Path, out: str | Path, use_ema: bool = False, overwrite: bool = False) -> Path:
    """A training checkpoint or an export folder -> a Lightning checkpoint of the reference DiT
    (esolm_dist.reference)."""
    from esolm_dist.data.tokenizer import load_tokenizer
    from esolm_dist.inference.export_io import CONFIG_FILE, read_export
    from esolm_dist.reference.convert import write_reference

    if (Path(source) / CONFIG_FILE).is_file():
        if use_ema:
            raise ExportError(f"{source} is an export: it holds one set of weights, --ema applies to training "
                              "checkpoints")
        exported = read_export(source)
        config, weights = exported.config, exported.state_dict
        tokens = exported.tokenizer.get_vocab_size(with_added_tokens=True)
    else:
        directory = resolve_checkpoint(source)
        meta, network = read_checkpoint_weights(directory, use_ema)
        tokenizer_name = meta["config"]["data"]["tokenizer"]
        tokenizer = load_tokenizer(None if tokenizer_name == "bundled" else tokenizer_name)
        weights = to_reference_layout(network, meta["config"]["model"]["num_heads"])
        config, tokens = export_config(meta, weights, tokenizer, "float32"), tokenizer.vocab_size
    return write_reference(out, config, weights, tokens, overwrite)


def verify_export(path: Path, meta: dict, network: dict[str, torch.Tensor],
                  dtype: torch.dtype = torch.float32) -> float:
    """Rebuild the training network from the checkpoint weights (rounded to the export's dtype) and the
    plain-torch model from the export; compare their fp32 logits on a fixed batch of diffusion and
    sequential rows. Returns the largest absolute difference."""
    from esolm_dist.config import ModelConfig, ParallelConfig
    from esolm_dist.eso.rows import build_rows
    from esolm_dist.inference.model import EsoLM
    from esolm_dist.model.transformer import EsoTransformer
    from esolm_dist.parallel.state import init_parallel

    init_parallel(ParallelConfig(device="cpu"))
    model_cfg = ModelConfig(**meta["config"]["model"])
    reference = EsoTransformer(model_cfg, meta["tokenizer_vocab"], meta["mask_id"]).eval()
    rounded = {name: tensor.to(dtype).float() for name, tensor in network.items()}
    missing, unexpected = reference.load_state_dict(rounded, strict=False)
    missing = [name for name in missing if not name.endswith("_extra_state")]
    if missing or unexpected:
        raise ExportError(f"checkpoint weights do not fit the model of its config (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]}); the checkpoint is from another version")
    exported = EsoLM.from_pretrained(path, dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, meta["mask_id"], (4, model_cfg.seq_len), generator=gen)
    x[x == meta["mask_id"]] = 0
    rows = build_rows(x, alpha0=0.5, kappa=0.5, variant="B", loss_type="elbo", eps=1e-3, mask_id=meta["mask_id"],
                      generator=gen)
    with torch.no_grad():
        expected = reference(rows.tokens, rows.positions, rows.masks)
        got = exported(rows.tokens, rows.positions, attn_mask=rows.masks.dense()[:, 0])
    finite = torch.isfinite(expected)
    if not torch.equal(finite, torch.isfinite(got)):
        raise ExportError(f"{path}: the export blocks different token ids than the checkpoint; re-export")
    return float((expected[finite] - got[finite]).abs().max())
