"""``train.init_from``: a new run starts from the weights of an export or of a checkpoint of any layout.

Only the weights carry over; the step, optimizer state, learning-rate schedule, data order and
MLflow run start fresh. This is how a model starts a new run in another layout (a resumed run may change
any layout too, with its optimizer state: esolm_dist.reshard) or is fine-tuned from an export.

Every rank reads only what it holds (its pipeline stage's parameters, each cut to this TP rank's
slice along megatron's ``partition_dim``) from a safetensors file, through safetensors' slicing
(``get_slice``: the file is memory-mapped, only the slice's bytes are read):

- an export: its model.safetensors (reference layout: the QKV rows of this rank's heads are read as
  three row ranges, q, k and v, and regrouped per head);
- a training checkpoint: rank 0 consolidates it once (esolm_dist.checkpoint_reader: every TP rank,
  ZeRO-3 partitions, the fp32 master of a bf16 run) into ``RUN_DIR/init_from.safetensors`` in
  network names; the other ranks wait, read their slices, and rank 0 removes the file. Consolidating
  once costs rank 0 one full fp32 copy and one file write; every rank consolidating (as before) cost
  each rank the full copy, and under ZeRO-3 DeepSpeed's zero_to_fp32 on every rank.

It runs before the DeepSpeed engine exists, so ZeRO then shards the loaded weights like freshly
initialised ones.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from esolm_dist.errors import CheckpointError
from esolm_dist.weight_layout import VOCAB_ROWS, network_parameters, tensor_parallel_dim

CONSOLIDATED = "init_from.safetensors"


@dataclasses.dataclass
class SourceWeights:
    """The model a run starts from: a safetensors file to read slices of, in network names or (an
    export) in the reference layout, and the tokenizer ids it was trained with."""

    description: str
    tokenizer_vocab: int
    mask_id: int
    path: Path
    reference_layout: bool  # export names and [all q; all k; all v] QKV rows
    num_heads: int
    temporary: bool = False  # rank 0 wrote it for this start and removes it once loaded
    elements_read: int = 0  # entries read from the file so far (the slices, not the whole tensors)


def read_source_weights(path: str | Path, run_dir: str | Path) -> SourceWeights:
    """An export folder (config.json) or a training checkpoint (a step directory, its ``latest``
    pointer, a checkpoints/ folder or a run directory; the live weights). Collective for checkpoints."""
    from esolm_dist.checkpoint_reader import read_checkpoint_weights, resolve_checkpoint
    from esolm_dist.inference.export_io import CONFIG_FILE, WEIGHTS_FILE, read_export_metadata

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={path} does not exist; pass an export folder or a checkpoint")
    if (path / CONFIG_FILE).is_file():
        config, tokenizer = read_export_metadata(path)
        return SourceWeights(f"export {path}", tokenizer.get_vocab_size(with_added_tokens=True),
                             config.mask_token_id, path / WEIGHTS_FILE, True, config.num_heads)
    directory = resolve_checkpoint(path)
    consolidated = Path(run_dir) / CONSOLIDATED
    facts = [None]
    if dist.get_rank() == 0:
        try:
            meta, weights = read_checkpoint_weights(directory, use_ema=False)
            partial = consolidated.with_suffix(".partial")
            save_file({name: tensor.contiguous() for name, tensor in weights.items()}, str(partial))
            os.replace(partial, consolidated)
            del weights
            facts = [(meta["step"], meta["tokenizer_vocab"], meta["mask_id"], meta["config"]["model"]["num_heads"])]
        except CheckpointError as error:  # every rank stops with rank 0's one line
            facts = [str(error)]
    dist.broadcast_object_list(facts, src=0)
    if isinstance(facts[0], str):
        raise CheckpointError(facts[0])
    step, vocab, mask_id, num_heads = facts[0]
    return SourceWeights(f"checkpoint {directory} (step {step})", vocab, mask_id, consolidated, False, num_heads,
                         temporary=True)


def load_source_weights(module: nn.Module, source: SourceWeights, num_layers: int, tokenizer_vocab: int,
                        mask_id: int) -> None:
    """Copy ``source`` into the parameters this rank holds of ``module`` (the network, before the engine
    applies parallelism: each parameter is already this TP rank's shard). Collective when the source
    is a consolidated checkpoint (rank 0 removes the file once every rank has read it)."""
    try:
        _load(module, source, num_layers, tokenizer_vocab, mask_id)
    finally:
        if source.temporary:
            dist.barrier()
            if dist.get_rank() == 0:
                source.path.unlink(missing_ok=True)


def _load(module: nn.Module, source: SourceWeights, num_layers: int, tokenizer_vocab: int, mask_id: int) -> None:
    from esolm_dist.weight_layout import rename

    if (source.tokenizer_vocab, source.mask_id) != (tokenizer_vocab, mask_id):
        raise CheckpointError(f"train.init_from: the {source.description} was trained with a tokenizer of "
                              f"{source.tokenizer_vocab} tokens (mask id {source.mask_id}), this run's has "
                              f"{tokenizer_vocab} (mask id {mask_id}); set data.tokenizer to the source's")
    tp_rank, tp_size = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    with safe_open(str(source.path), framework="pt") as handle:
        stored = {(rename(key, to_export=False) if source.reference_layout else key): key for key in handle.keys()}
        source_layers = len({name.split(".")[1] for name in stored if name and name.startswith("blocks.")})
        if source_layers != num_layers:
            raise CheckpointError(f"train.init_from: the {source.description} has {source_layers} layers, this run "
                                  f"{num_layers}; set model.num_layers={source_layers}")
        for _, name, param in network_parameters(module):
            if name not in stored:
                raise CheckpointError(f"train.init_from: the {source.description} has no tensor {name}; set model.* "
                                      "(num_layers, hidden_size, num_heads, ...) to the source's")
            local = read_tp_slice(handle.get_slice(stored[name]), source, name, param, tp_rank, tp_size)
            with torch.no_grad():
                param.copy_(local)


def read_tp_slice(stored, source: SourceWeights, name: str, param: nn.Parameter, tp_rank: int,
                tp_size: int) -> torch.Tensor:
    """This TP rank's part of tensor ``name``, read from the file's slice handle ``stored``: the rows
    (or columns) of megatron's TP chunk; vocabulary rows cut or zero-padded to this layout's padded
    vocabulary (rows past the tokenizer's are never used); QKV rows of an export regrouped per head."""
    shape = list(stored.get_shape())
    dim = tensor_parallel_dim(param) if tp_size > 1 else None
    wanted = list(param.shape)
    if dim is not None:
        wanted[dim] *= tp_size
    comparable = [s for i, s in enumerate(shape) if not (name in VOCAB_ROWS and i == 0)]
    if len(shape) != len(wanted) or comparable != [s for i, s in enumerate(wanted)
                                                   if not (name in VOCAB_ROWS and i == 0)]:
        raise CheckpointError(f"train.init_from: tensor {name} of the {source.description} gives shape "
                              f"{shape} here, the model has {wanted}; set model.* (hidden_size, num_heads, "
                              "ffn_hidden_size, ...) to the source's")
    if dim is None:
        start, stop, dim = 0, param.shape[0] if name in VOCAB_ROWS else shape[0], 0
    else:
        start, stop = tp_rank * param.shape[dim], (tp_rank + 1) * param.shape[dim]
    if source.reference_layout and name.endswith("qkv.weight"):
        return _qkv_rows(stored, source, start, stop)
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, min(stop, shape[dim]))
    local = stored[tuple(index)].float()
    source.elements_read += local.numel()
    if local.shape[dim] < stop - start:  # vocabulary rows this source lacks: zeros
        pad = list(local.shape)
        pad[dim] = stop - start - local.shape[dim]
        local = torch.cat([local, local.new_zeros(pad)], dim=dim)
    return local


def _qkv_rows(stored, source: SourceWeights, start: int, stop: int) -> torch.Tensor:
    """Megatron's QKV rows [start, stop) (whole heads, per head [q, k, v]) from an export's
    [all q; all k; all v] rows: three row ranges, regrouped."""
    from esolm_dist.weight_layout import reorder_qkv

    rows = stored.get_shape()[0] // 3  # rows of q (= of k = of v)
    first, last = start // 3, stop // 3  # the same heads' rows within each of q, k, v
    parts = [stored[part * rows + first: part * rows + last].float() for part in range(3)]
    source.elements_read += sum(p.numel() for p in parts)
    heads = (last - first) // (rows // source.num_heads)
    return reorder_qkv(torch.cat(parts), heads, to_export=False)
