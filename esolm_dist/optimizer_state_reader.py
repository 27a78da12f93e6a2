"""The full optimizer state of a training checkpoint of any layout (TP x PP x DP, ZeRO stage 0-3), in
network names: fp32 master weights, Adam's exp_avg and exp_avg_sq, Adam's step, the LR schedule and
DeepSpeed's step counters. A resume in another layout (esolm_dist.reshard) starts from here.

Where DeepSpeed keeps the state (file names carry the TP rank, or ``stage x TP + TP rank`` with a
pipeline: "model-parallel index" below):

- ZeRO-0: torch's optimizer state dict in ``mp_rank_<mp>_model_states.pt``, keyed by the position of
  each parameter in the rank's module (names from ``optimizer_parameters``, which esolm_dist.checkpoint
  stores in rank_XXXXX.pt); the fp32 weights are the module's own;
- ZeRO-1/2 (and DeepSpeed's bf16 optimizer): per DP rank, one flat fp32 partition per parameter group
  in ``[bf16_]zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt``, with the (start, numel) of each
  parameter's fragment in it (``param_slice_mappings``);
- ZeRO-3: per DP rank, every parameter's own equal slice, in the order of ``param_shapes``
  (``zero_pp_rank_<dp>_mp_rank_<tp>_model_states.pt``).

Everything is read weights-only (esolm_dist.safe_load); TP pieces are merged through
esolm_dist.weight_layout, as the weights are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from esolm_dist.checkpoint_reader import _live_weights, _load
from esolm_dist.errors import CheckpointError
from esolm_dist.weight_layout import merge_tensor_parallel, network_name, unpartition_zero3

KINDS = ("master", "exp_avg", "exp_avg_sq")


@dataclass
class FullOptimizerState:
    tensors: dict[str, dict[str, torch.Tensor]]  # kind (KINDS) -> network name -> full fp32 tensor
    step: int  # Adam steps taken (its bias correction)
    lr_scheduler: dict  # the LambdaLR state
    counters: dict  # DeepSpeed's global_steps, global_samples, skipped_steps


def _mp_index(tp_rank: int, stage: int, layout: dict) -> int:
    return stage * layout["tensor"] + tp_rank if layout["pipeline"] > 1 else tp_rank


def _global_rank(tp_rank: int, dp_rank: int, stage: int, layout: dict) -> int:
    """megatron's rank order: TP fastest, then DP, then PP."""
    return tp_rank + layout["tensor"] * (dp_rank + layout["data"] * stage)


def _step_of(state: dict, where: Path) -> int:
    steps = {int(s["step"]) for s in state.values() if "step" in s}
    if len(steps) != 1:
        raise CheckpointError(f"{where}: the optimizer's parameters have taken different numbers of steps "
                              f"({sorted(steps)}); the checkpoint is damaged: resume an earlier step")
    return steps.pop()


def _zero0(directory: Path, tp_rank: int, stage: int, layout: dict, num_layers: int) -> tuple[dict, int]:
    """Moments of one (TP rank, stage) from torch's optimizer state, named by rank_XXXXX.pt's list."""
    path = directory / f"mp_rank_{_mp_index(tp_rank, stage, layout):02d}_model_states.pt"
    optimizer = _load(path)["optimizer"]
    rank_path = directory / f"rank_{_global_rank(tp_rank, 0, stage, layout):05d}.pt"
    names = _load(rank_path).get("optimizer_parameters")
    if names is None:
        raise CheckpointError(f"{rank_path} lacks optimizer_parameters (written before esolm-dist resumed in other "
                              "layouts); resume it in its own layout, or start from its weights with train.init_from")
    order = [p for group in optimizer["param_groups"] for p in group["params"]]
    if len(order) != len(names):
        raise CheckpointError(f"{path} holds {len(order)} optimizer parameters but {rank_path} names {len(names)}; "
                              "the checkpoint is damaged: resume an earlier step")
    out = {kind: {} for kind in KINDS[1:]}
    for index, name in zip(order, names, strict=True):
        for kind in KINDS[1:]:
            out[kind][name] = optimizer["state"][index][kind].float()
    return out, _step_of(optimizer["state"], path)


def _zero12(directory: Path, tp_rank: int, stage: int, layout: dict, num_layers: int) -> tuple[dict, int]:
    """Master weights and moments of one (TP rank, stage) from its DP ranks' flat fp32 partitions."""
    mp = _mp_index(tp_rank, stage, layout)
    shapes = {}
    for group in _load(directory / f"mp_rank_{mp:02d}_model_states.pt")["param_shapes"]:
        shapes.update(group)
    pieces: dict[str, dict[str, list]] = {kind: {} for kind in KINDS}
    step = None
    for dp in range(layout["data"]):
        paths = sorted(directory.glob(f"*zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"))
        if not paths:
            raise CheckpointError(f"{directory}: the ZeRO optimizer partition of DP rank {dp}, model-parallel index "
                                  f"{mp} is missing; the checkpoint is incomplete: resume an earlier step")
        state = _load(paths[0])["optimizer_state_dict"]
        base = state["base_optimizer_state"]["state"]
        step = _step_of(base, paths[0])
        for group, mappings in enumerate(state["param_slice_mappings"]):
            flats = {"master": state["single_partition_of_fp32_groups"][group], "exp_avg": base[group]["exp_avg"],
                     "exp_avg_sq": base[group]["exp_avg_sq"]}
            for name, fragment in mappings.items():
                for kind, flat in flats.items():
                    pieces[kind].setdefault(name, []).append(flat.narrow(0, fragment.start, fragment.numel))
    return _assemble(pieces, shapes, layout, num_layers, directory), step


def _zero3(directory: Path, tp_rank: int, layout: dict, num_layers: int) -> tuple[dict, int]:
    """Master weights and moments of one TP rank: every parameter's equal slice on each DP rank."""
    group_shapes = _load(directory / f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_model_states.pt")["param_shapes"]
    shapes = {name: shape for group in group_shapes for name, shape in group.items()}
    pieces: dict[str, dict[str, list]] = {kind: {} for kind in KINDS}
    step = None
    for dp in range(layout["data"]):
        path = directory / f"zero_pp_rank_{dp}_mp_rank_{tp_rank:02d}_optim_states.pt"
        state = _load(path)["optimizer_state_dict"]
        base = state["optimizer_state_dict"]["state"]
        step = _step_of(base, path)
        for group, flat_master in enumerate(state["fp32_flat_groups"]):
            flats = {"master": flat_master, "exp_avg": base[group]["exp_avg"], "exp_avg_sq": base[group]["exp_avg_sq"]}
            offset = 0
            for name, shape in group_shapes[group].items():  # the flat group holds its parameters in this order
                size = -(-shape.numel() // layout["data"])
                for kind, flat in flats.items():
                    pieces[kind].setdefault(name, []).append(flat.narrow(0, offset, size))
                offset += size
    full = {kind: {name: unpartition_zero3(parts, shapes[name]) for name, parts in by_name.items()}
            for kind, by_name in pieces.items()}
    return _renamed(full, False, num_layers), step


def _assemble(pieces: dict, shapes: dict, layout: dict, num_layers: int, directory: Path) -> dict:
    full = {kind: {} for kind in KINDS}
    for kind, by_name in pieces.items():
        for name, parts in by_name.items():
            flat = torch.cat(parts)
            if flat.numel() != shapes[name].numel():
                raise CheckpointError(f"{directory}: {name} has {flat.numel()} optimizer entries over the DP "
                                      f"partitions, not {shapes[name].numel()}; resume an earlier step")
            full[kind][name] = flat.view(shapes[name]).float()
    return _renamed(full, layout["pipeline"] > 1, num_layers)


def _renamed(full: dict, pipelined: bool, num_layers: int) -> dict:
    return {kind: {network_name(name, pipelined, num_layers): t for name, t in by_name.items()}
            for kind, by_name in full.items()}


def _engine_state(directory: Path, zero_stage: int) -> dict:
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    return _load(directory / name)


def read_optimizer_state(directory: Path, meta: dict) -> FullOptimizerState:
    """The full fp32 optimizer state of the checkpoint in ``directory`` (esolm.json's ``meta``)."""
    layout, zero_stage = meta["layout"], meta["config"]["parallel"]["zero_stage"]
    num_layers = meta["config"]["model"]["num_layers"]
    zero12 = zero_stage in (1, 2) or any(directory.glob("bf16_zero_pp_rank_*_optim_states.pt"))
    shards, steps = [], set()
    for tp_rank in range(layout["tensor"]):
        if zero_stage == 3:
            shard, step = _zero3(directory, tp_rank, layout, num_layers)
            steps.add(step)
        else:
            shard = {kind: {} for kind in KINDS}
            for stage in range(layout["pipeline"]):
                reader = _zero12 if zero12 else _zero0
                part, step = reader(directory, tp_rank, stage, layout, num_layers)
                steps.add(step)
                for kind, tensors in part.items():
                    shard[kind].update(tensors)
            if not zero12:  # ZeRO-0 fp32: the module's weights are the master weights
                live = _live_weights(directory, tp_rank, layout["pipeline"], num_layers)
                shard["master"] = {name: tensor.float() for name, tensor in live.items()}
        shards.append(shard)
    if len(steps) != 1:
        raise CheckpointError(f"{directory}: ranks have taken different numbers of optimizer steps ({sorted(steps)}); "
                              "the checkpoint is damaged: resume an earlier step")
    try:
        tensors = {kind: merge_tensor_parallel([shard[kind] for shard in shards]) for kind in KINDS}
    except KeyError as missing:
        raise CheckpointError(f"{directory}: the optimizer state of {missing.args[0]} is missing from some "
                              "tensor-parallel rank; the checkpoint is incomplete: resume an earlier step") from None
    engine = _engine_state(directory, zero_stage)
    counters = {key: engine.get(key, 0) for key in ("global_steps", "global_samples", "skipped_steps")}
    return FullOptimizerState(tensors, steps.pop(), engine["lr_scheduler"], counters)

