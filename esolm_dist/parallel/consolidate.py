"""Full (unsharded) weights of a running distributed model, in the network names of
esolm_dist.weight_layout, on every rank.

Training shards a parameter in up to three ways, undone here in this order: ZeRO-3 partitions it
over the data-parallel group (live parameters are gathered with
``deepspeed.zero.GatheredParameters``; EMA shadows, which copy ``ds_tensor``, by hand the same way);
tensor parallelism splits it along megatron's ``partition_dim`` (shards concatenated in TP-rank
order); pipeline parallelism puts it on one stage (the stages' dicts are exchanged). ZeRO-1/2 keep
full parameters in the module, so only the TP step applies to them.

Every function here is collective: call it on every rank, in the same order. Every rank gets the
full fp32 tensors on the CPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from esolm_dist.parallel.state import Topology
from esolm_dist.weight_layout import (
    is_zero3_partitioned,
    network_parameters,
    tensor_parallel_dim,
    unpartition_zero3,
)


def _gather_stages(local: dict[str, torch.Tensor], topo: Topology) -> dict[str, torch.Tensor]:
    """Every pipeline stage's tensors on every rank (a no-op without pipeline parallelism)."""
    if topo.pp_size == 1:
        return local
    stages = [None] * topo.pp_size
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    return {name: tensor for stage in stages for name, tensor in stage.items()}


def gather_tensor_parallel(local: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The full tensor of a TP shard ``local`` of ``param`` (returned as is when replicated)."""
    dim = tensor_parallel_dim(param)
    if dim is None or ps.get_tensor_model_parallel_world_size() == 1:
        return local
    shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=dim)


def gather_zero3_partition(partition: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The full tensor (shape ``param.ds_shape``) behind one rank's flat ZeRO-3 partition of ``param``."""
    group = param.ds_process_group
    pieces = [torch.empty_like(partition) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(pieces, partition.contiguous(), group=group)
    return unpartition_zero3(pieces, param.ds_shape)


def full_state_dict(engine_module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Every parameter of the network in ``engine_module``, whole, fp32, on the CPU, on every rank.

    Names are the network's (``blocks.0.qkv.weight``, ...), the same for any TP degree and ZeRO
    stage, so a TP=2 / ZeRO-3 model compares directly with a single-process one.
    """
    full = {}
    for _, name, param in network_parameters(engine_module):
        if is_zero3_partitioned(param):
            import deepspeed

            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                local = param.detach().float().clone()
        else:
            local = param.detach().float().clone()
        full[name] = gather_tensor_parallel(local, param).cpu()
    return _gather_stages(full, topo)


def full_ema_state_dict(ema, module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """The EMA weights (esolm_dist.ema.EMA, built from ``module``) whole, fp32, on the CPU, on every rank."""
    full = {}
    for key, name, param in network_parameters(module):
        shadow = ema.shadow[key].detach().float()
        if is_zero3_partitioned(param):
            shadow = gather_zero3_partition(shadow, param)
        full[name] = gather_tensor_parallel(shadow, param).cpu().clone()
    return _gather_stages(full, topo)
