"""Full (unsharded) weights of a running distributed model, in the TP=1 naming of EsoTransformer.

Training shards a parameter in up to two ways, undone here in this order:

1. ZeRO-3 partitions every parameter over the data-parallel group. DeepSpeed flattens the
   parameter, pads it with zeros to a multiple of the DP size, and gives DP rank r the
   ``numel / dp`` elements starting at ``r * numel / dp`` (``param.ds_tensor``); the
   module's ``param.data`` is an empty placeholder between forward passes.
   Live parameters are gathered with ``deepspeed.zero.GatheredParameters``; EMA shadows,
   which copy ``ds_tensor``, are gathered by hand the same way.
2. Tensor parallelism splits megatron-core's layers along one dimension: megatron marks the
   shards ``tensor_model_parallel=True`` with their ``partition_dim``; the TP ranks' shards
   are concatenated along it in TP-rank order. LayerNorms are replicated and kept as they are.

Every function here is collective: call it on every rank, in the same order. Every rank
gets the full fp32 tensors on the CPU. ZeRO-1/2 keep full fp32 parameters in the module,
so only the TP step applies to them.
3. Pipeline parallelism puts different layers on different stages under PipelineModule's names
   (``"<layer index>.<name>"``): they are renamed and the stages' dicts are exchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from esolm_dist.parallel.state import Topology


def network_prefix(module: nn.Module) -> str:
    """The name prefix of the EsoTransformer inside ``module`` ("network." for the training
    objective, "" for the network itself, which is also used for any other module)."""
    from esolm_dist.model.transformer import EsoTransformer

    for name, sub in module.named_modules():
        if isinstance(sub, EsoTransformer):
            return f"{name}." if name else ""
    return ""


def network_parameters(module: nn.Module):
    """(name in ``module``, name in EsoTransformer, parameter) for the network's parameters."""
    from deepspeed.pipe import PipelineModule

    from esolm_dist.parallel.pipeline import network_name

    if isinstance(module, PipelineModule):
        for name, param in module.named_parameters():
            layer, rest = name.split(".", 1)
            yield name, network_name(int(layer), rest, module.num_layers), param
        return
    prefix = network_prefix(module)
    for name, param in module.named_parameters():
        if name.startswith(prefix):
            yield name, name[len(prefix):], param


def _gather_stages(local: dict[str, torch.Tensor], topo: Topology) -> dict[str, torch.Tensor]:
    """Every pipeline stage's tensors on every rank (a no-op without pipeline parallelism)."""
    if topo.pp_size == 1:
        return local
    stages = [None] * topo.pp_size
    dist.all_gather_object(stages, local, group=ps.get_pipeline_model_parallel_group())
    return {name: tensor for stage in stages for name, tensor in stage.items()}


def tensor_parallel_dim(param: nn.Parameter) -> int | None:
    """The dimension megatron splits ``param`` along across TP ranks; None when it is replicated."""
    if not getattr(param, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_world_size() == 1:
        return None
    stride = getattr(param, "partition_stride", 1)
    if stride != 1:
        raise NotImplementedError(f"strided TP partitions (partition_stride={stride}) are not supported")
    return param.partition_dim


def gather_tensor_parallel(local: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The full tensor of a TP shard ``local`` of ``param`` (returned as is when replicated)."""
    dim = tensor_parallel_dim(param)
    if dim is None:
        return local
    shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    dist.all_gather(shards, local.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=dim)


def gather_zero3_partition(partition: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The full tensor (shape ``param.ds_shape``) behind one rank's flat ZeRO-3 partition of ``param``.

    Every DP rank holds an equal-sized slice; the last one ends in zero padding, dropped here.
    """
    group = param.ds_process_group
    pieces = [torch.empty_like(partition) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(pieces, partition.contiguous(), group=group)
    return torch.cat(pieces)[:param.ds_numel].view(param.ds_shape)


def is_zero3_partitioned(param: nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def full_state_dict(engine_module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Every parameter of the network in ``engine_module``, whole, fp32, on the CPU, on every rank.

    Names are EsoTransformer's (``blocks.0.qkv.weight``, ...), the same for any TP degree and
    ZeRO stage, so a TP=2 / ZeRO-3 model compares directly with a single-process one.
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
    """The EMA weights (esolm_dist.ema.EMA, built from ``module``) whole, fp32, on the CPU, on every rank.

    Under ZeRO-3 each shadow is this rank's flat partition (a copy of ``param.ds_tensor``):
    it is gathered over the DP group first, then over the TP group like the live weights.
    """
    full = {}
    for key, name, param in network_parameters(module):
        shadow = ema.shadow[key].detach().float()
        if is_zero3_partitioned(param):
            shadow = gather_zero3_partition(shadow, param)
        full[name] = gather_tensor_parallel(shadow, param).cpu().clone()
    return _gather_stages(full, topo)
