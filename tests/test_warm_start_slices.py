"""train.init_from reads each rank's slice of the source, not the whole file (esolm_dist.warm_start).

For every tensor of an export (reference layout, QKV rows [all q; all k; all v]) and of a network-named
file, and each rank of TP=2, the slice read through safetensors' get_slice equals the old path: the
whole tensor read, turned into network layout (weight_layout.from_reference_layout), then cut with
weight_layout.tensor_parallel_slice; the entries read are this rank's only.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esolm_dist.warm_start import SourceWeights, read_tp_slice
from esolm_dist.weight_layout import tensor_parallel_slice, to_reference_layout

TP = 2


def tp2_shard(param: torch.nn.Parameter, name: str, extra_vocab_rows: int) -> torch.nn.Parameter:
    """An empty stand-in for TP rank r's shard of ``param`` (megatron's attributes, halved along partition_dim);
    vocabulary rows padded further (a TP=2 layout pads the vocabulary to another multiple)."""
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] //= TP
    if name in ("embedding.word.weight", "head.output.weight", "head.output.bias"):
        shape[0] += extra_vocab_rows
    shard = torch.nn.Parameter(torch.empty(shape))
    for attribute in ("tensor_model_parallel", "partition_dim", "partition_stride"):
        if hasattr(param, attribute):
            setattr(shard, attribute, getattr(param, attribute))
    return shard


@pytest.mark.parametrize("reference_layout", [True, False])
@pytest.mark.parametrize("extra_vocab_rows", [0, 8, -4])
def test_each_tp_rank_reads_only_its_slice(tiny_network, tmp_path, reference_layout, extra_vocab_rows):
    torch.manual_seed(1)
    network = {name: torch.randn_like(p) for name, p in tiny_network.named_parameters()}
    params = dict(tiny_network.named_parameters())
    stored = to_reference_layout(network, num_heads=4) if reference_layout else network
    path = tmp_path / "weights.safetensors"
    save_file(stored, str(path))
    keys = dict(zip(network, stored, strict=True))  # network name -> stored name (same order)
    total = sum(t.numel() for t in network.values())
    read_by_rank = []
    for rank in range(TP):
        source = SourceWeights("test source", 0, 0, path, reference_layout, num_heads=4)
        with safe_open(str(path), framework="pt") as handle:
            for name, full in network.items():
                shard = tp2_shard(params[name], name, extra_vocab_rows)
                got = read_tp_slice(handle.get_slice(keys[name]), source, name, shard, rank, TP)
                expected = tensor_parallel_slice(full, shard, name, rank, TP)
                assert got.shape == shard.shape and torch.equal(got, expected), (name, rank)
        read_by_rank.append(source.elements_read)
    for count in read_by_rank:  # about half of the file each: the split tensors' halves, the small replicated ones
        assert count < 0.6 * total, (read_by_rank, total)
