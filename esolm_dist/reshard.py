"""Resume a checkpoint in another layout (TP x PP x DP, ZeRO stage): every rank reads the full fp32
state (esolm_dist.optimizer_state_reader, and the EMA through esolm_dist.checkpoint_reader), cuts its
own slice through esolm_dist.weight_layout (TP partition dims, vocabulary padding, ZeRO-3 partitions)
and puts it where DeepSpeed keeps it: the module's weights, the ZeRO partitions of the master weights
and Adam moments (ZeRO-3 through DeepSpeed's safe_set_local_* API), or torch's optimizer state under
ZeRO-0; then the
Adam step, the LR schedule and DeepSpeed's step counters.

Why not DeepSpeed's universal checkpoints (ds_to_universal + checkpoint.load_universal): they read
and load ZeRO optimizer partitions only, so ZeRO-0 (every TP-only and PP-only layout here, and the
single process) can be neither their source nor their target, and a pipeline's per-layer files
would also need Megatron-DeepSpeed's parameter patterns. One path here covers every pair of layouts.

What cannot map 1:1 across layouts: each rank's RNG. The noise of every micro-batch is keyed by
(seed, step, micro-batch, DP rank) already; the generators (dropout) are reseeded from (seed, step,
DP rank) (esolm_dist.checkpoint.reseed). The data position is the writing layout's: the new DP rank r
continues from DP rank r's reader state (rank 0's where the old layout had fewer DP ranks).
"""

from __future__ import annotations

from pathlib import Path

import torch

from esolm_dist.checkpoint import load_rank_state
from esolm_dist.checkpoint_reader import read_checkpoint_weights
from esolm_dist.errors import CheckpointError
from esolm_dist.optimizer_state_reader import KINDS, FullOptimizerState, read_optimizer_state
from esolm_dist.parallel.state import Topology
from esolm_dist.weight_layout import (
    is_zero3_partitioned,
    local_shape,
    network_parameters,
    tensor_parallel_slice,
    zero3_partition,
)


def load_resharded(engine, ema, directory: Path, meta: dict, topo: Topology) -> dict:
    """Put the checkpoint in ``directory`` (its esolm.json: ``meta``) into this rank of another layout:
    DeepSpeed ``engine`` and ``ema`` (or None) in place. Returns the rank state the trainer continues
    from: the data reader's state, ``rng`` None (reseed) and ``ema`` None (already loaded)."""
    saved = meta["layout"]
    dp_rank = topo.dp_rank if topo.dp_rank < saved["data"] else 0
    source = load_rank_state(directory, saved["tensor"] * dp_rank)  # TP rank 0, first stage of that replica
    put_optimizer_state(engine, read_optimizer_state(directory, meta), topo)
    if ema is not None and source.get("ema") is not None:
        _, full = read_checkpoint_weights(directory, use_ema=True)
        ema.load_state_dict({"decay": source["ema"]["decay"], "shadow": _ema_shadow(engine.module, full, topo)})
    return {"data": source["data"], "rng": None, "ema": None}


def _local(full: torch.Tensor, param, name: str, topo: Topology) -> torch.Tensor:
    """This rank's tensor of ``param`` (its TP slice), checked against the parameter's shape."""
    piece = tensor_parallel_slice(full, param, name, topo.tp_rank, topo.tp_size)
    if piece.shape != local_shape(param):
        raise CheckpointError(f"{name}: the checkpoint's tensor gives TP rank {topo.tp_rank} a {tuple(piece.shape)} "
                              f"slice but this run's parameter is {tuple(local_shape(param))}; the checkpoint is of "
                              "another model")
    return piece


def _ema_shadow(module: torch.nn.Module, full: dict[str, torch.Tensor], topo: Topology) -> dict[str, torch.Tensor]:
    """The EMA's per-rank shadows (keyed by the module's names; ZeRO-3: the DP partition)."""
    shadow = {}
    for module_name, name, param in network_parameters(module):
        piece = _local(full[name], param, name, topo)
        shadow[module_name] = (zero3_partition(piece, topo.dp_rank, topo.dp_size) if is_zero3_partitioned(param)
                               else piece).float().clone()
    return shadow


# DeepSpeed optimizers that keep one flat fp32 partition per parameter group: (attribute of the
# groups' parameters, attribute of the partitions)
FLAT_PARTITIONS = {"DeepSpeedZeroOptimizer": ("bit16_groups", "single_partition_of_fp32_groups"),
                   "BF16_Optimizer": ("bf16_groups", "fp32_groups_flat_partition")}


@torch.no_grad()
def put_optimizer_state(engine, full: FullOptimizerState, topo: Topology) -> None:
    """This rank's slice of the weights, master weights and Adam moments, then the step, LR schedule
    and counters, into DeepSpeed's ``engine``."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)  # ZeRO and bf16 wrap torch's optimizer
    for partition in getattr(optimizer, "fp32_partitioned_groups_flat", []):  # ZeRO-3: Adam's state, before the
        base.state.setdefault(partition, {"step": torch.tensor(float(full.step)),  # first step would create it
                                          "exp_avg": torch.zeros_like(partition),
                                          "exp_avg_sq": torch.zeros_like(partition)})
    locals_ = {}
    for _, name, param in network_parameters(engine.module):
        missing = [kind for kind in KINDS if name not in full.tensors[kind]]
        if missing:
            raise CheckpointError(f"the checkpoint has no {', '.join(missing)} for {name}; it is of another model")
        local = {kind: _local(full.tensors[kind][name], param, name, topo) for kind in KINDS}
        if is_zero3_partitioned(param):  # this rank's equal slice of every parameter
            parts = {kind: zero3_partition(t, topo.dp_rank, topo.dp_size).to(param.ds_tensor.device)
                     for kind, t in local.items()}
            param.ds_tensor.copy_(parts["master"])
            safe_set_local_fp32_param(param, parts["master"])
            for kind in KINDS[1:]:
                safe_set_local_optimizer_state(param, parts[kind], kind)
            continue
        param.copy_(local["master"])
        locals_[param] = local
    if type(optimizer).__name__ in FLAT_PARTITIONS:
        _put_flat_partitions(optimizer, base, locals_, full.step)
    elif not is_zero3_partitioned(next(engine.module.parameters())):  # ZeRO-0: torch's (or apex's) own state
        for param, local in locals_.items():
            base.state[param] = {"step": torch.tensor(float(full.step)),
                                 **{kind: local[kind].to(param.device, torch.float32).clone() for kind in KINDS[1:]}}
    _set_step(base, full.step)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(full.lr_scheduler)
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr
    engine.global_steps = full.counters["global_steps"]
    engine.global_samples = full.counters["global_samples"]
    engine.skipped_steps = full.counters["skipped_steps"]


def _put_flat_partitions(optimizer, base, locals_: dict, step: int) -> None:
    """ZeRO-1/2 and DeepSpeed's bf16 optimizer: each parameter's fragment in this rank's flat fp32
    partition (DeepSpeed's ``_hp_mapping`` says where), as the master weights and as the Adam state
    of that partition (which torch would create at the first step), linked to the parameters' fragments."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    groups_name, partitions_name = FLAT_PARTITIONS[type(optimizer).__name__]
    for params, partition in zip(getattr(optimizer, groups_name), getattr(optimizer, partitions_name), strict=True):
        flats = {kind: torch.zeros_like(partition) for kind in KINDS}
        for param in params:
            mapping = param._hp_mapping
            if mapping is None:  # no part of this parameter is in this rank's partition
                continue
            lp, hp = mapping.lp_fragment_address, mapping.get_hp_fragment_address()
            for kind, flat in flats.items():
                fragment = locals_[param][kind].flatten().narrow(0, lp.start, lp.numel)
                flat.narrow(0, hp.start, hp.numel).copy_(fragment)
        partition.copy_(flats["master"])
        base.state[partition] = {"step": torch.tensor(float(step)), "exp_avg": flats["exp_avg"],
                                 "exp_avg_sq": flats["exp_avg_sq"]}
        lazy_init_hp_params_optimizer_state(params, partition, base.state)  # what DeepSpeed's step would link
    optimizer._hp_optimizer_states_linked = True


def _set_step(optimizer: torch.optim.Optimizer, step: int) -> None:
    """Adam's step (its bias correction) on every state entry; apex keeps it per group."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = torch.full_like(state["step"], float(step))
        elif "step" in state:
            state["step"] = step
    for group in optimizer.param_groups:
        if "step" in group:
            group["step"] = step
