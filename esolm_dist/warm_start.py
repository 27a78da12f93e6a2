"""``train.init_from``: a new run starts from the weights of an export or of a checkpoint of any layout.

Only the weights carry over; the step, optimizer state, learning-rate schedule, data order and
MLflow run start fresh. This is how a model starts a new run in another layout (a resumed run may change
any layout too, with its optimizer state: esolm_dist.reshard) or is fine-tuned from an export.

Every rank reads the whole source (one model's fp32 weights, in EsoTransformer's names) and
copies in what it holds: its pipeline stage's parameters, each cut to this TP rank's slice along
megatron's ``partition_dim``. It runs before the DeepSpeed engine exists, so ZeRO then shards
the loaded weights like freshly initialised ones.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from megatron.core import parallel_state as ps
from torch import nn

from esolm_dist.errors import CheckpointError
from esolm_dist.weight_layout import from_reference_layout, network_parameters, tensor_parallel_slice


@dataclasses.dataclass
class SourceWeights:
    """The full weights of the model a run starts from, and the tokenizer ids they were trained with."""

    description: str
    tokenizer_vocab: int
    mask_id: int
    weights: dict[str, torch.Tensor]


def read_source_weights(path: str | Path) -> SourceWeights:
    """An export folder (config.json) or a training checkpoint (a step directory, its ``latest``
    pointer, a checkpoints/ folder or a run directory; the live weights)."""
    from esolm_dist.checkpoint_reader import read_checkpoint_weights, resolve_checkpoint
    from esolm_dist.inference.export_io import CONFIG_FILE, read_export

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"train.init_from={path} does not exist; pass an export folder or a checkpoint")
    if (path / CONFIG_FILE).is_file():
        export = read_export(path)
        weights = {name: tensor.float() for name, tensor in export.state_dict.items()}
        return SourceWeights(f"export {path}", export.tokenizer.get_vocab_size(with_added_tokens=True),
                             export.config.mask_token_id, from_reference_layout(weights, export.config.num_heads))
    directory = resolve_checkpoint(path)
    meta, weights = read_checkpoint_weights(directory, use_ema=False)
    return SourceWeights(f"checkpoint {directory} (step {meta['step']})", meta["tokenizer_vocab"], meta["mask_id"],
                         weights)


def load_source_weights(module: nn.Module, source: SourceWeights, num_layers: int, tokenizer_vocab: int,
                        mask_id: int) -> None:
    """Copy ``source`` into the parameters this rank holds of ``module`` (the network, before the engine
    applies parallelism: each parameter is already this TP rank's shard)."""
    if (source.tokenizer_vocab, source.mask_id) != (tokenizer_vocab, mask_id):
        raise CheckpointError(f"train.init_from: the {source.description} was trained with a tokenizer of "
                              f"{source.tokenizer_vocab} tokens (mask id {source.mask_id}), this run's has "
                              f"{tokenizer_vocab} (mask id {mask_id}); set data.tokenizer to the source's")
    source_layers = len({name.split(".")[1] for name in source.weights if name.startswith("blocks.")})
    if source_layers != num_layers:
        raise CheckpointError(f"train.init_from: the {source.description} has {source_layers} layers, this run "
                              f"{num_layers}; set model.num_layers={source_layers}")
    for _, name, param in network_parameters(module):
        if name not in source.weights:
            raise CheckpointError(f"train.init_from: the {source.description} has no tensor {name}; set model.* "
                                  "(num_layers, hidden_size, num_heads, ...) to the source's")
        local = tensor_parallel_slice(source.weights[name], param, name, ps.get_tensor_model_parallel_rank(),
                                      ps.get_tensor_model_parallel_world_size())
        if local.shape != param.shape:
            raise CheckpointError(f"train.init_from: tensor {name} of the {source.description} gives shape "
                                  f"{list(local.shape)} here, the model has {list(param.shape)}; set model.* "
                                  "(hidden_size, num_heads, ffn_hidden_size, ...) to the source's")
        with torch.no_grad():
            param.copy_(local)
