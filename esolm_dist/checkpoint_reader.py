"""The full weights of a training checkpoint of any layout (TP x PP, ZeRO stage 0-3, live or EMA),
read offline on one process: the export tool, warm starts and the GPU check read checkpoints here.

The DeepSpeed model files of every tensor-parallel rank are renamed to network names and merged
along each weight's partition dimension (esolm_dist.weight_layout); ZeRO-3 weights come from the
optimizer partitions, and so do the live weights of a bf16 run (its module files hold the bf16 copy).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from tqdm import tqdm

from esolm_dist.checkpoint import LATEST, META, CheckpointError, checkpoint_root, read_meta
from esolm_dist.safe_load import load_file, refusal, weights_only_loads
from esolm_dist.weight_layout import merge_tensor_parallel, network_name, unpartition_zero3


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


def _tensors(weights: dict) -> dict[str, torch.Tensor]:
    """Drop megatron's `_extra_state` entries (None here): they carry no weights."""
    return {k: v for k, v in weights.items() if isinstance(v, torch.Tensor)}


def _live_weights(directory: Path, tp_rank: int, pp: int, num_layers: int) -> dict[str, torch.Tensor]:
    if pp == 1:
        module = _load(directory / f"mp_rank_{tp_rank:02d}_model_states.pt")["module"]
        return {name: v for k, v in _tensors(module).items() if (name := network_name(k, False, num_layers))}
    weights = {}
    for layer in range(num_layers + 2):  # embedding, blocks, head: one file per layer and TP rank
        state = _load(directory / f"layer_{layer:02d}-model_{tp_rank:02d}-model_states.pt")
        weights.update({network_name(f"{layer}.{k}", True, num_layers): v for k, v in _tensors(state).items()})
    return weights


def _master_weights(directory: Path, tp_rank: int, layout: dict, num_layers: int,
                    live: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 master of a bf16 ZeRO-1/2 run (the module files hold its bf16 copy): each DP rank's
    DeepSpeed optimizer file (named in its rank_*.pt) holds one flat fp32 partition and DeepSpeed's
    ``param_slice_mappings``, where in it each parameter's fragment lies; a parameter's fragments on
    DP ranks 0, 1, ... are consecutive pieces of it. Shapes and names come from the module files."""
    tp, dp, pipelined = layout["tensor"], layout["data"], layout["pipeline"] > 1
    pieces: dict[str, list[torch.Tensor]] = {}
    for stage in range(layout["pipeline"]):
        for d in range(dp):
            rank_file = directory / f"rank_{tp_rank + tp * d + tp * dp * stage:05d}.pt"
            name = _load(rank_file).get("optimizer_file")
            if name is None:
                raise CheckpointError(f"{rank_file} does not name its optimizer file (written before esolm-dist "
                                      "recorded it): this bf16 checkpoint's fp32 master cannot be found; export "
                                      "with --dtype bf16")
            state = _load(directory / name)["optimizer_state_dict"]
            for flat, mapping in zip(state["single_partition_of_fp32_groups"], state["param_slice_mappings"],
                                     strict=True):
                for key, address in mapping.items():
                    piece = flat.narrow(0, address.start, address.numel).float()
                    pieces.setdefault(network_name(key, pipelined, num_layers), []).append(piece)
    weights = {}
    for name, reference in live.items():
        flat = torch.cat(pieces.get(name, []))
        if flat.numel() != reference.numel():
            raise CheckpointError(f"{directory}: the optimizer files hold {flat.numel()} of the {reference.numel()} "
                                  f"fp32 master entries of {name}; the checkpoint is incomplete: export an earlier "
                                  "step")
        weights[name] = flat.view(reference.shape)
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
    return {name: v for k, v in weights.items() if (name := network_name(k, False, 0))}


def _ema_states(directory: Path, ranks: list[int]) -> list[dict]:
    states = [_load(directory / f"rank_{rank:05d}.pt").get("ema") for rank in ranks]
    if any(state is None for state in states):
        raise CheckpointError(f"{directory} has no EMA weights (optim.ema was 0); export without --ema")
    return states


def _assemble_slices(states: list[dict], key: str) -> torch.Tensor:
    """One TP-local tensor from the DP ranks' flat EMA slices (esolm_dist.ema: ``slices`` = start, shape)."""
    _, shape = states[0]["slices"][key]
    flat = torch.zeros(torch.Size(shape).numel(), dtype=torch.float32)
    covered = 0
    for state in states:
        start, _ = state["slices"][key]
        piece = state["shadow"][key].float().reshape(-1)
        flat[start: start + piece.numel()] = piece
        covered += piece.numel()
    if covered != flat.numel():
        raise CheckpointError(f"the EMA slices of {key} cover {covered} of {flat.numel()} entries; the checkpoint's "
                              "rank_*.pt files are incomplete: export an earlier step")
    return flat.view(shape)


def _ema_weights(directory: Path, tp_rank: int, layout: dict, num_layers: int,
                 zero3_shapes: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """EMA weights of TP rank ``tp_rank`` (megatron rank order: TP fastest, then DP, then PP): each DP
    rank of a stage holds one flat slice of every tensor. Checkpoints written before the EMA was
    partitioned hold whole shadows per DP replica (ZeRO-3: one partition per DP rank)."""
    weights = {}
    tp, dp = layout["tensor"], layout["data"]
    for stage in range(layout["pipeline"]):
        states = _ema_states(directory, [tp_rank + tp * d + tp * dp * stage for d in range(dp)])
        for key in states[0]["shadow"]:
            name = network_name(key, layout["pipeline"] > 1, num_layers)
            if "slices" in states[0]:
                weights[name] = _assemble_slices(states, key)
            elif zero3_shapes is not None:
                weights[name] = unpartition_zero3([s["shadow"][key] for s in states], zero3_shapes[name])
            else:
                weights[name] = states[0]["shadow"][key]
    return weights


def read_checkpoint_weights(directory: Path, use_ema: bool) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, the network's full fp32 weights in the EsoTransformer naming) for any TP x PP layout and ZeRO stage."""
    meta = read_meta(directory)
    layout, zero_stage = meta["layout"], meta["config"]["parallel"]["zero_stage"]
    num_layers = meta["config"]["model"]["num_layers"]
    bf16 = meta["config"]["parallel"].get("precision") == "bf16"  # live weights: the fp32 master, not the module's
    shards = []
    for tp_rank in tqdm(range(layout["tensor"]), desc="reading tensor-parallel ranks", disable=layout["tensor"] < 2):
        if zero_stage == 3:
            live = _zero3_weights(directory, tp_rank)
            shapes = {name: tensor.shape for name, tensor in live.items()}
            shards.append(_ema_weights(directory, tp_rank, layout, num_layers, shapes) if use_ema else live)
        elif use_ema:
            shards.append(_ema_weights(directory, tp_rank, layout, num_layers))
        else:
            live = _live_weights(directory, tp_rank, layout["pipeline"], num_layers)
            if bf16 and zero_stage > 0:
                live = _master_weights(directory, tp_rank, layout, num_layers, live)
            shards.append(live)
    try:
        return meta, merge_tensor_parallel(shards)
    except KeyError as missing:
        raise CheckpointError(f"{directory}: tensor {missing.args[0]} is missing from some tensor-parallel rank "
                              "files; the checkpoint is incomplete: export an earlier step") from None
