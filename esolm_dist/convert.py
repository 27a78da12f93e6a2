"""``python tools/convert.py export`` (command line: esolm_dist.convert_cli): a training checkpoint -> one
self-contained export folder.

The export (safetensors weights in the reference layout of design.md, config.json, the
tokenizer, a model card) loads with plain torch for single-GPU KV-cached sampling
(esolm_dist.inference). The checkpoint is read offline, on one process: the DeepSpeed model
files of every tensor-parallel rank are merged along each weight's partition dimension and
megatron's per-head QKV rows are reordered to [all q; all k; all v].
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from tqdm import tqdm

from esolm_dist.checkpoint import LATEST, META, CheckpointError, checkpoint_root, read_meta
from esolm_dist.inference.export_io import ExportConfig, ExportError, training_run_card_line, write_export
from esolm_dist.parallel.pipeline import network_name
from esolm_dist.safe_load import load_file, refusal, weights_only_loads

# Which dimension megatron-core splits across TP ranks, by parameter suffix (None = replicated).
PARTITION_DIM = {
    "embedding.word.weight": 0,
    "qkv.weight": 0,
    "out.weight": 1,
    "out.bias": None,
    "fc1.weight": 0,
    "fc1.bias": 0,
    "fc2.weight": 1,
    "fc2.bias": None,
    "output.weight": 0,
    "output.bias": 0,
}
MODULE_PREFIX = "network."
VERIFY_TOLERANCE = 1e-5  # max |logit difference| between the export and the training network (fp32 logits)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a step directory, a ``latest`` pointer file, a checkpoints/ folder or a run directory."""
    path = Path(path)
    for pointer in (path, path / LATEST, checkpoint_root(path) / LATEST):
        if pointer.is_file() and pointer.name == LATEST:
            path = pointer.parent / pointer.read_text().strip()
            break
    if not (path / META).is_file():
        raise CheckpointError(f"{path} is not a complete esolm-dist checkpoint (no {META}); pass "
                              "RUN_DIR/checkpoints/latest or a step_* directory")
    return path


def partition_dim(name: str) -> int | None:
    for suffix, dim in PARTITION_DIM.items():
        if name.endswith(suffix):
            return dim
    return None


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]], source: Path) -> dict[str, torch.Tensor]:
    """Full tensors from the state dicts of TP ranks 0..T-1 (replicated ones must agree)."""
    merged = {}
    for name in shards[0]:
        if any(name not in shard for shard in shards):
            raise CheckpointError(f"{source}: tensor {name} is missing from some tensor-parallel rank files; the "
                                  "checkpoint is incomplete: export an earlier step")
        dim = partition_dim(name)
        parts = [shard[name].float() for shard in shards]
        merged[name] = torch.cat(parts, dim=dim) if dim is not None else parts[0]
    return merged


def _load(path: Path) -> dict:
    try:
        return load_file(path)
    except CheckpointError:
        raise  # refused as unsafe: the message says why
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete: export an earlier step") from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc.__class__.__name__}); export an earlier "
                              "step or re-save the checkpoint") from None


# Training-network name prefix <-> export (reference layout) prefix, both directions. Inside a block
# (after "blocks.N.") the layer norms keep their names.
TOP_LEVEL_NAMES = (("embedding.word.", "embed."), ("head.final_ln.", "final_ln."), ("head.output.", "head."))
BLOCK_NAMES = (("qkv.", "attn.qkv."), ("out.", "attn.out."), ("fc1.", "mlp.fc1."), ("fc2.", "mlp.fc2."),
               ("ln1.", "ln1."), ("ln2.", "ln2."))


def _rename(name: str, to_export: bool) -> str | None:
    """One tensor name in the other naming, or None when no rule covers it."""
    source, target = (0, 1) if to_export else (1, 0)
    parts = name.split(".")
    if parts[0] == "blocks":
        prefix, rest, rules = f"blocks.{parts[1]}.", ".".join(parts[2:]), BLOCK_NAMES
    else:
        prefix, rest, rules = "", name, TOP_LEVEL_NAMES
    for rule in rules:
        if rest.startswith(rule[source]):
            return prefix + rule[target] + rest[len(rule[source]):]
    return None


def _reorder_qkv(tensor: torch.Tensor, num_heads: int, to_export: bool) -> torch.Tensor:
    """Megatron's QKV rows are per head ([q, k, v] of head 0, then head 1, ...); the export's are
    [all q; all k; all v]. The same transpose goes either way, from the other grouping."""
    rows, hidden = tensor.shape
    grouping = (num_heads, 3) if to_export else (3, num_heads)
    return tensor.view(*grouping, rows // (3 * num_heads), hidden).transpose(0, 1).reshape(rows, hidden)


def _convert_layout(weights: dict[str, torch.Tensor], num_heads: int, to_export: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        renamed = _rename(name, to_export)
        if renamed is None:
            where = "checkpoint" if to_export else "export"
            error = CheckpointError if to_export else ExportError
            raise error(f"unexpected tensor {name} in the {where}; it was not written by this version of esolm-dist")
        out[renamed] = _reorder_qkv(tensor, num_heads, to_export) if renamed.endswith("qkv.weight") else tensor
    return out


def to_reference_layout(network: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Megatron names and QKV row order -> the export's reference names and [all q; all k; all v]."""
    return _convert_layout(network, num_heads, to_export=True)


def from_reference_layout(weights: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """The inverse of to_reference_layout: export names and [all q; all k; all v] -> megatron's."""
    return _convert_layout(weights, num_heads, to_export=False)


def _tensors(weights: dict) -> dict[str, torch.Tensor]:
    """Drop megatron's `_extra_state` entries (None here): they carry no weights."""
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _live_weights(directory: Path, tp_rank: int, pp: int, num_layers: int) -> dict[str, torch.Tensor]:
    if pp == 1:
        module = _load(directory / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"]
        return {k[len(MODULE_PREFIX):]: v for k, v in _tensors(module).items() if k.startswith(MODULE_PREFIX)}
    weights = {}
    for layer in range(num_layers + 2):  # embedding, blocks, head: one file per layer and TP rank
        state = _load(directory / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")
        weights.update({network_name(layer, k, num_layers): v for k, v in _tensors(state).items()})
    return weights


def _zero3_weights(directory: Path, tp_rank: int) -> dict[str, torch.Tensor]:
    """ZeRO-3 keeps the fp32 weights only in the optimizer partitions: let DeepSpeed's own
    zero_to_fp32 merge the DP partitions of one TP rank (it reads every file it finds, so it is
    shown a folder that holds only this TP rank's files)."""
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        view = Path(scratch) / directory.name
        view.mkdir()
        for file in directory.glob(f"*mp_rank_{tp_rank:02d}_*states.pt"):
            (view / file.name).symlink_to(file.resolve())
        try:
            with weights_only_loads():
                weights = get_fp32_state_dict_from_zero_checkpoint(scratch, tag=directory.name)
        except pickle.UnpicklingError as exc:
            raise refusal(directory, exc) from None
        except (ValueError, FileNotFoundError, RuntimeError, EOFError) as exc:
            raise CheckpointError(f"{directory}: ZeRO-3 partitions of TP rank {tp_rank} are missing or truncated "
                                  f"({str(exc).splitlines()[0][:160]}); export an earlier step") from None
    return {k[len(MODULE_PREFIX):]: v for k, v in weights.items() if k.startswith(MODULE_PREFIX)}


def _unpartition(partitions: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ZeRO-3 splits the flattened parameter into equal (end-padded) partitions, one per DP rank."""
    return torch.cat([p.flatten() for p in partitions])[: shape.numel()].view(shape)


def _ema_weights(directory: Path, tp_rank: int, layout: dict, num_layers: int,
                 zero3_shapes: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """EMA shadows of DP replica 0 (megatron rank order: TP fastest, then DP, then PP); under ZeRO-3
    each DP rank holds one partition of every shadow."""
    if zero3_shapes is not None:
        states = [_load(directory / f"rank_{tp_rank + layout['tensor'] * dp:05d}.pt").get("ema")
                  for dp in range(layout["data"])]
        if states[0] is None:
            raise CheckpointError(f"{directory} has no EMA weights (optim.ema was 0); export without --ema")
        return {name[len(MODULE_PREFIX):]: _unpartition([s["shadow"][name] for s in states],
                                                        zero3_shapes[name[len(MODULE_PREFIX):]])
                for name in states[0]["shadow"]}
    weights = {}
    for stage in range(layout["pipeline"]):
        rank = tp_rank + layout["tensor"] * layout["data"] * stage
        state = _load(directory / f"rank_{rank:05d}.pt").get("ema")
        if state is None:
            raise CheckpointError(f"{directory} has no EMA weights (optim.ema was 0); export without --ema")
        for name, tensor in state["shadow"].items():
            if layout["pipeline"] == 1:
                weights[name[len(MODULE_PREFIX):]] = tensor
            else:
                layer, rest = name.split(".", 1)
                weights[network_name(int(layer), rest, num_layers)] = tensor
    return weights


def read_checkpoint_weights(directory: Path, use_ema: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, the network's full fp32 weights in the EsoTransformer naming) for any TP x PP layout and ZeRO stage."""
    meta = read_meta(directory)
    layout, zero_stage = meta["layout"], meta["config"]["parallel"]["zero_stage"]
    num_layers = meta["config"]["model"]["num_layers"]
    shards = []
    for tp_rank in tqdm(range(layout["tensor"]), desc="reading tensor-parallel ranks", disable=layout["tensor"] < 2):
        if zero_stage == 3:
            live = _zero3_weights(directory, tp_rank)
            shapes = {name: tensor.shape for name, tensor in live.items()}
            shards.append(_ema_weights(directory, tp_rank, layout, num_layers, shapes) if use_ema else live)
        else:
            shards.append(_ema_weights(directory, tp_rank, layout, num_layers) if use_ema
                          else _live_weights(directory, tp_rank, layout["pipeline"], num_layers))
    return meta, merge_tensor_parallel(shards, directory)


def export_config(meta: dict, weights: dict[str, torch.Tensor], tokenizer, dtype: str) -> ExportConfig:
    m, e = meta["config"]["model"], meta["config"]["eso"]
    return ExportConfig.from_dict({
        "format": "esolm-export-v1", "vocab_size": int(weights["embed.weight"].shape[0]),
        "hidden_size": m["hidden_size"], "num_layers": m["num_layers"], "num_heads": m["num_heads"],
        "ffn_hidden_size": m["ffn_hidden_size"] or 4 * m["hidden_size"], "rotary_base": float(m["rotary_base"]),
        "layernorm_eps": float(m["layernorm_eps"]), "mask_token_id": meta["mask_id"],
        "eos_token_id": tokenizer.eos_id, "max_seq_len": m["seq_len"], "variant": e["variant"],
        "alpha0": float(e["alpha0"]), "dtype": dtype,
    }, "the checkpoint's config")


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
