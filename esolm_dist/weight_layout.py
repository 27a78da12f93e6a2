"""Where every weight of the network lives: its names, its tensor-parallel and ZeRO-3 pieces, its
export layout. Consolidation, export, warm start and import all go through here.

Names. The one network (esolm_dist.model.transformer.EsoTransformer) names its parameters
``embedding.word.weight``, ``blocks.<i>.<name>``, ``head.<name>`` ("network names", the same for
every layout). Around it:

- the training objective (plain engine, and its checkpoint files ``mp_rank_<tp>_model_states.pt``)
  prefixes them with ``network.``;
- a pipeline-parallel model (esolm_dist.parallel.pipeline) names them ``<layer>.<name>`` with layer
  0 the embedding, 1..L the blocks and L + 1 the head (files ``layer_<layer>-model_<tp>-...``);
- an export uses the reference layout of design.md (``embed.``, ``blocks.<i>.attn.qkv.``, ...,
  ``head.``), with the fused QKV rows as [all q; all k; all v] instead of megatron's per-head
  [q, k, v] groups.

Pieces. Tensor parallelism splits megatron-core's layers along the ``partition_dim`` megatron sets
on each parameter (replicated ones have none); ZeRO-3 flattens each parameter, pads it to a
multiple of the DP size and gives DP rank r the r-th equal slice (``param.ds_tensor``).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn

from esolm_dist.errors import CheckpointError
from esolm_dist.inference.export_io import ExportError

OBJECTIVE_PREFIX = "network."  # the objective's attribute holding the network

# Training-network name prefix <-> export (reference layout) prefix. Inside a block (after
# "blocks.N.") the layer norms keep their names.
TOP_LEVEL_NAMES = (("embedding.word.", "embed."), ("head.final_ln.", "final_ln."), ("head.output.", "head."))
BLOCK_NAMES = (("qkv.", "attn.qkv."), ("out.", "attn.out."), ("fc1.", "mlp.fc1."), ("fc2.", "mlp.fc2."),
               ("ln1.", "ln1."), ("ln2.", "ln2."))

# Network names whose first dimension is the (padded) vocabulary: the padding depends on the TP size.
VOCAB_ROWS = ("embedding.word.weight", "head.output.weight", "head.output.bias")


# ---- names ------------------------------------------------------------------------------------------
def network_name_from_pipeline(layer: int, rest: str, num_layers: int) -> str:
    """A PipelineModule layer index + parameter name -> the network name of that parameter."""
    if layer == 0:
        return f"embedding.{rest}"
    if layer <= num_layers:
        return f"blocks.{layer - 1}.{rest}"
    return f"head.{rest}"


def network_name(module_name: str, pipelined: bool, num_layers: int) -> str | None:
    """The network name of a parameter named ``module_name`` in the training module (objective or
    pipeline stages); None for entries outside the network."""
    if pipelined:
        layer, rest = module_name.split(".", 1)
        return network_name_from_pipeline(int(layer), rest, num_layers)
    return module_name[len(OBJECTIVE_PREFIX):] if module_name.startswith(OBJECTIVE_PREFIX) else None


def network_parameters(module: nn.Module):
    """(name in ``module``, network name, parameter) for the network's parameters in ``module``: the
    network itself, the training objective or this rank's pipeline stages."""
    from deepspeed.pipe import PipelineModule

    pipelined = isinstance(module, PipelineModule)
    has_prefix = any(name.startswith(OBJECTIVE_PREFIX) for name, _ in module.named_parameters())
    for name, param in module.named_parameters():
        if pipelined:
            yield name, network_name(name, True, module.num_layers), param
        elif not has_prefix:
            yield name, name, param
        elif (network := network_name(name, False, 0)) is not None:
            yield name, network, param


def rename(name: str, to_export: bool) -> str | None:
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


def reorder_qkv(tensor: torch.Tensor, num_heads: int, to_export: bool) -> torch.Tensor:
    """Megatron's QKV rows are per head ([q, k, v] of head 0, then head 1, ...); the export's are
    [all q; all k; all v]. The same transpose goes either way, from the other grouping."""
    rows, hidden = tensor.shape
    grouping = (num_heads, 3) if to_export else (3, num_heads)
    return tensor.view(*grouping, rows // (3 * num_heads), hidden).transpose(0, 1).reshape(rows, hidden)


def _convert_layout(weights: dict[str, torch.Tensor], num_heads: int, to_export: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        renamed = rename(name, to_export)
        if renamed is None:
            where, error = ("checkpoint", CheckpointError) if to_export else ("export", ExportError)
            raise error(f"unexpected tensor {name} in the {where}; it was not written by this version of esolm-dist")
        out[renamed] = reorder_qkv(tensor, num_heads, to_export) if renamed.endswith("qkv.weight") else tensor
    return out


def to_reference_layout(network: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """Network names and megatron's QKV row order -> the export's reference names and [all q; all k; all v]."""
    return _convert_layout(network, num_heads, to_export=True)


def from_reference_layout(weights: dict[str, torch.Tensor], num_heads: int) -> dict[str, torch.Tensor]:
    """The inverse of to_reference_layout: export names and [all q; all k; all v] -> network names."""
    return _convert_layout(weights, num_heads, to_export=False)


# ---- tensor-parallel pieces ---------------------------------------------------------------------------
def tensor_parallel_dim(param: nn.Parameter) -> int | None:
    """The dimension megatron splits ``param`` along across TP ranks (its own attributes); None when
    it is replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    stride = getattr(param, "partition_stride", 1)
    if stride != 1:
        raise NotImplementedError(f"strided TP partitions (partition_stride={stride}) are not supported")
    return param.partition_dim


@contextlib.contextmanager
def _outside_process_groups():
    """megatron-core's TP getters answer "1 rank, rank 0" while a skeleton network is built in a process
    without parallel groups (an offline export); unchanged when groups exist."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        yield
        return
    ps.set_tensor_model_parallel_world_size(1)
    ps.set_tensor_model_parallel_rank(0)
    try:
        yield
    finally:
        ps.set_tensor_model_parallel_world_size(None)
        ps.set_tensor_model_parallel_rank(None)


@functools.cache
def _partition_dims_by_component_name() -> dict[str, int | None]:
    """megatron's partition_dim of every parameter, by its name inside its component (``word.weight``,
    ``qkv.weight``, ``output.bias``, ...), read off a tiny one-block network: the dims do not depend on
    the sizes."""
    from esolm_dist.config import ModelConfig
    from esolm_dist.model.transformer import EsoTransformer

    with _outside_process_groups():
        skeleton = EsoTransformer(ModelConfig(num_layers=1, hidden_size=8, num_heads=1, seq_len=4), 8, 7)
    return {_component_name(name): tensor_parallel_dim(param) for name, param in skeleton.named_parameters()}


def _component_name(network: str) -> str:
    """``blocks.3.qkv.weight`` -> ``qkv.weight``; ``head.output.bias`` -> ``output.bias``."""
    parts = network.split(".")
    return ".".join(parts[2:] if parts[0] == "blocks" else parts[1:])


def partition_dim(network: str) -> int | None:
    """The TP partition dimension of the parameter with this network name (None: replicated)."""
    dims = _partition_dims_by_component_name()
    name = _component_name(network)
    if name not in dims:
        raise CheckpointError(f"unexpected tensor {network} in the checkpoint; it was not written by this version of "
                              "esolm-dist")
    return dims[name]


def merge_tensor_parallel(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from the network-named state dicts of TP ranks 0..T-1 (replicated tensors are
    taken from rank 0). Raises KeyError naming a tensor some rank lacks."""
    merged = {}
    for name in shards[0]:
        missing = [rank for rank, shard in enumerate(shards) if name not in shard]
        if missing:
            raise KeyError(name)
        parts = [shard[name].float() for shard in shards]
        dim = partition_dim(name) if len(parts) > 1 else None
        merged[name] = torch.cat(parts, dim=dim) if dim is not None else parts[0]
    return merged


def tensor_parallel_slice(full: torch.Tensor, param: nn.Parameter, name: str, tp_rank: int,
                          tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s part of the full tensor of network name ``name``; vocabulary rows are first
    cut or zero-padded to this layout's padded vocabulary (rows past the tokenizer's are never used)."""
    dim = tensor_parallel_dim(param) if tp_size > 1 else None
    if name in VOCAB_ROWS:
        rows = local_shape(param)[0] * (tp_size if dim is not None else 1)
        if full.shape[0] >= rows:
            full = full[:rows]
        else:
            full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    if dim is None:
        return full
    return full.chunk(tp_size, dim=dim)[tp_rank]


# ---- ZeRO-3 pieces ------------------------------------------------------------------------------------
def is_zero3_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def local_shape(param: nn.Parameter) -> torch.Size:
    """The shape of this TP rank's tensor (under ZeRO-3 ``param`` itself is an empty placeholder)."""
    return param.ds_shape if is_zero3_partitioned(param) else param.shape


def zero3_partition(full: torch.Tensor, dp_rank: int, dp_size: int) -> torch.Tensor:
    """DP rank ``dp_rank``'s flat ZeRO-3 partition of ``full``: equal slices of ceil(numel / dp_size),
    the last one zero-padded (the inverse of unpartition_zero3)."""
    size = -(-full.numel() // dp_size)
    flat = full.flatten()
    flat = torch.cat([flat, flat.new_zeros(size * dp_size - flat.numel())])
    return flat[dp_rank * size:(dp_rank + 1) * size]


def unpartition_zero3(partitions: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """The full tensor of ``shape`` from its DP ranks' flat ZeRO-3 partitions (the last ends in zero
    padding, dropped here)."""
    return torch.cat([p.flatten() for p in partitions])[: shape.numel()].view(shape)
