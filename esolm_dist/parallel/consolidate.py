"""Full (unsharded) weights of a running distributed model, in the network names of
esolm_dist.weight_layout, on every rank or on one.

Training shards a parameter in up to three ways, undone here in this order: ZeRO-3 partitions it
over the data-parallel group (live parameters are gathered with
``deepspeed.zero.GatheredParameters``; EMA shadows, which copy ``ds_tensor``, by hand the same way);
tensor parallelism splits it along megatron's ``partition_dim`` (shards concatenated in TP-rank
order); pipeline parallelism puts it on one stage (the stages' dicts are exchanged). ZeRO-1/2 keep
full parameters in the module, so only the TP step applies to them.

The EMA (esolm_dist.ema) is kept as one flat slice of each parameter per DP rank, reassembled here
from the slices' recorded starts.

Every function here is collective: call it on every rank, in the same order. ``full_state_dict`` and
``full_ema_state_dict`` give every rank the full fp32 tensors on the CPU; ``full_state_dict_on``
gives them to one rank only, tensor by tensor, so the others never hold more than one gathered
tensor (text samples at evaluation need the weights on the sampling rank alone).
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


def full_state_dict(engine_module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """Every parameter of the network in ``engine_module``, whole, fp32, on the CPU, on every rank.

    Names are the network's (``blocks.0.qkv.weight``, ...), the same for any TP degree and ZeRO
    stage, so a TP=2 / ZeRO-3 model compares directly with a single-process one.
    """
    full = {name: gather_tensor_parallel(_whole_local(param), param).cpu()
            for _, name, param in network_parameters(engine_module)}
    return _gather_stages(full, topo)


def _whole_local(param: nn.Parameter) -> torch.Tensor:
    """This TP rank's whole parameter in fp32 (a ZeRO-3 gather over the DP group: collective)."""
    if is_zero3_partitioned(param):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            return param.detach().float().clone()
    return param.detach().float().clone()


def logging_rank(topo: Topology) -> int:
    """The global rank of Topology.is_logging_rank (TP 0, DP 0, last stage; megatron orders ranks TP
    fastest, then DP, then PP)."""
    return (topo.pp_size - 1) * topo.tp_size * topo.dp_size


def full_state_dict_on(engine_module: nn.Module, topo: Topology, dst: int) -> dict[str, torch.Tensor] | None:
    """Like full_state_dict, but the weights end up on global rank ``dst`` only (None on every other).

    Only ``dst``'s DP replica sends: first each rank's parameter names, shapes and TP dims (to ``dst``),
    then each of its TP shards point-to-point, in that order, one at a time; ``dst`` receives them rank
    by rank and concatenates each parameter's shards. A ZeRO-3 parameter is gathered over its DP group
    by every replica (DeepSpeed's gather is collective) and dropped at once where it is not sent.
    """
    from esolm_dist.weight_layout import local_shape

    sending = topo.dp_rank == (dst // topo.tp_size) % topo.dp_size
    listing = None
    if sending:
        own = [(name, list(local_shape(param)), tensor_parallel_dim(param))
               for _, name, param in network_parameters(engine_module)]
        group = ps.get_model_parallel_group()  # TP x PP of this replica: dst is in it
        members = dist.get_process_group_ranks(group)
        gathered = [None] * len(members) if topo.rank == dst else None
        dist.gather_object(own, gathered, dst=dst, group=group)
        listing = dict(zip(members, gathered, strict=True)) if topo.rank == dst else None
    mine = {}
    for _, name, param in network_parameters(engine_module):
        local = _whole_local(param)
        if topo.rank == dst:
            mine[name] = local.cpu()
        elif sending:
            dist.send(local.to(topo.device), dst)
        del local
    return _receive_shards(listing, mine, topo) if topo.rank == dst else None


def _receive_shards(listing: dict[int, list], mine: dict[str, torch.Tensor], topo: Topology) -> dict:
    """On the receiving rank: every parameter from its holders' TP shards (its own, or sent to it)."""
    shards: dict[str, list[torch.Tensor]] = {}
    dims: dict[str, int | None] = {}
    for rank in sorted(listing):  # global ranks: TP fastest, then stages; each sends in its own order
        for name, shape, dim in listing[rank]:
            dims[name] = dim
            if rank == topo.rank:
                shards.setdefault(name, []).append(mine.pop(name))
                continue
            buffer = torch.empty(shape, dtype=torch.float32, device=topo.device)
            dist.recv(buffer, rank)
            shards.setdefault(name, []).append(buffer.cpu())
    full = {}
    for name in list(shards):  # popped one by one: a parameter's shards are freed once concatenated
        parts = shards.pop(name)
        full[name] = torch.cat(parts, dim=dims[name]) if dims[name] is not None and len(parts) > 1 else parts[0]
    return full


def _whole_ema(ema, key: str, param: nn.Parameter) -> torch.Tensor:
    """This TP rank's whole EMA tensor of ``param`` from the DP ranks' disjoint slices (an all-reduce
    of zero-filled copies: exact, each entry has one non-zero term)."""
    start, shape = ema.slices[key]
    flat = torch.zeros(torch.Size(shape).numel(), dtype=torch.float32, device=ema.shadow[key].device)
    piece = ema.shadow[key].detach().float()
    flat[start: start + piece.numel()] = piece
    group = param.ds_process_group if is_zero3_partitioned(param) else ps.get_data_parallel_group()
    if dist.get_world_size(group=group) > 1:
        dist.all_reduce(flat, group=group)
    return flat.view(shape)


def full_ema_state_dict(ema, module: nn.Module, topo: Topology) -> dict[str, torch.Tensor]:
    """The EMA weights (esolm_dist.ema.EMA, built from ``module``) whole, fp32, on the CPU, on every rank."""
    full = {}
    for key, name, param in network_parameters(module):
        full[name] = gather_tensor_parallel(_whole_ema(ema, key, param), param).cpu().clone()
    return _gather_stages(full, topo)
