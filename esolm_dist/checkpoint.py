"""Atomic training checkpoints: DeepSpeed's state plus ours, a ``latest`` pointer moved last.

Layout of ``RUN_DIR/checkpoints``::

    step_00000200/            DeepSpeed model + optimizer (ZeRO partitions) files
        rank_00000.pt         this rank's RNG states, data-reader state, EMA slice, the name of its
                              DeepSpeed optimizer file (tensors and plain data)
        esolm.json            step, consumed samples, layout, config, MLflow run id, run uid
    latest                    "step_00000200", replaced atomically after a complete save

A save goes to ``step_N.partial`` and is renamed only after every rank has finished, so a
crash mid-save never leaves a directory that ``latest`` points to or that resume accepts.
Pruning removes only older steps of the same run (its ``run_uid``), never the step just saved.
A resume in the layout that wrote the checkpoint is DeepSpeed's own load (``load``); one in another
layout (TP x PP x DP or ZeRO stage) goes through esolm_dist.reshard.
Every file is read weights-only (esolm_dist.safe_load): a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from esolm_dist.atomic_io import write_atomically
from esolm_dist.errors import CheckpointError
from esolm_dist.parallel.state import Topology
from esolm_dist.safe_load import load_file, refusal, weights_only_loads
from esolm_dist.weight_layout import network_parameters

LATEST = "latest"
META = "esolm.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def ensure_writable(run_dir: str | Path) -> None:
    """Fail at start-up, not after hours, when checkpoints could not be written."""
    root = checkpoint_root(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise CheckpointError(f"checkpoint directory {root} is not writable ({exc.strerror}); set train.run_dir "
                              "to a writable path") from None


def rng_state() -> dict:
    """Every generator's state as tensors and plain numbers (what a weights-only load rebuilds)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_initialized():  # this process trains on a GPU (not merely: a GPU exists)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def reseed(seed: int, step: int, dp_rank: int) -> None:
    """Generators of a rank that resumes in another layout (the old ranks' states do not map 1:1 onto
    the new ones): seeded from (seed, step, DP rank), so the same resume draws the same dropout."""
    value = (seed * 1_000_003 + step) * 7919 + dp_rank
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def layout_of(topo: Topology) -> dict:
    return {"tensor": topo.tp_size, "pipeline": topo.pp_size, "data": topo.dp_size}


def describe_layout(layout: dict, zero_stage: int) -> str:
    """``TP2 x PP2 x DP1 (ZeRO-1)``."""
    return f"TP{layout['tensor']} x PP{layout['pipeline']} x DP{layout['data']} (ZeRO-{zero_stage})"


def layout_change(meta: dict, topo: Topology, zero_stage: int) -> str | None:
    """None when this run has the checkpoint's layout and ZeRO stage, else "written with A in B"."""
    saved_stage = meta["config"]["parallel"]["zero_stage"]
    if meta["layout"] == layout_of(topo) and saved_stage == zero_stage:
        return None
    return (f"written with {describe_layout(meta['layout'], saved_stage)} in "
            f"{describe_layout(layout_of(topo), zero_stage)}")


def optimizer_parameter_names(module: torch.nn.Module) -> list[str]:
    """The network names of ``module``'s parameters in the order the optimizer holds them (ZeRO-0
    keeps torch's optimizer state keyed by position only)."""
    return [network for _, network, _ in network_parameters(module)]


def save(engine, run_dir: str | Path, step: int, meta: dict, rank_state: dict, topo: Topology,
         keep_last: int) -> Path:
    """Save on every rank; returns the final directory. ``meta`` is written by rank 0."""
    root = checkpoint_root(run_dir)
    final = root / tag_for(step)
    partial_tag = tag_for(step) + ".partial"
    engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
    partial = root / partial_tag
    if hasattr(engine.optimizer, "dp_process_group"):  # ZeRO-1/2/3, BF16_Optimizer: its fp32 master is in this file
        rank_state = {**rank_state, "optimizer_file": Path(engine._get_zero_ckpt_name(str(root), partial_tag)).name}
    rank_tmp = _rank_file(partial, topo.rank).with_suffix(".tmp")
    torch.save({**rank_state, "optimizer_parameters": optimizer_parameter_names(engine.module)}, rank_tmp)
    os.replace(rank_tmp, _rank_file(partial, topo.rank))
    dist.barrier()
    if topo.rank == 0:
        write_atomically(partial / META, json.dumps({**meta, "step": step, "layout": layout_of(topo),
                                                       "world_size": topo.world_size}, indent=2))
        if final.exists():  # this step saved before, and latest was moved back past it: keep that copy
            kept = final.with_name(f"{final.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(final, kept)
            print(f"esolm-train: {final} already existed; moved it to {kept}", flush=True)
        os.replace(partial, final)
        write_atomically(root / LATEST, final.name)
        _prune(root, keep_last, meta.get("run_uid"), step)
    dist.barrier()
    return final


def _step_dirs(root: Path) -> dict[int, Path]:
    """Complete step directories by step number (never by name order alone)."""
    return {int(m.group(1)): p for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()}


PRUNED = ".pruned"  # suffix of step folders being deleted in the background
_pruning: threading.Thread | None = None


def _prune(root: Path, keep_last: int, run_uid: str | None, saved_step: int) -> None:
    """Keep the newest ``keep_last`` steps up to ``saved_step`` of this run; steps of other runs,
    later steps and the one just saved are never removed.

    The old folders are renamed out of the way here (instant; a folder ending in ``.pruned`` is never
    read as a checkpoint) and deleted by a background thread, so no rank waits at the save barrier
    while rank 0 deletes gigabytes."""
    global _pruning
    wait_for_pruning()
    ours = []
    for step, path in sorted(_step_dirs(root).items()):
        if step <= saved_step and run_uid is not None and _run_uid_of(path) == run_uid:
            ours.append(path)
    for old in [*ours[:-keep_last], *root.glob("step_*.partial")]:
        os.replace(old, old.with_name(old.name + PRUNED))
    doomed = sorted(root.glob(f"*{PRUNED}"))  # also what an earlier, interrupted deletion left
    if doomed:
        _pruning = threading.Thread(target=_delete, args=(doomed,), name="esolm-prune", daemon=True)
        _pruning.start()


def _delete(folders: list[Path]) -> None:
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def wait_for_pruning() -> None:
    """Block until the background deletion of pruned checkpoints (if any) has finished."""
    global _pruning
    if _pruning is not None:
        _pruning.join()
        _pruning = None


def _run_uid_of(directory: Path) -> str | None:
    try:
        return json.loads((directory / META).read_text()).get("run_uid")
    except (OSError, ValueError, AttributeError):
        return None


def has_checkpoints(run_dir: str | Path) -> bool:
    root = checkpoint_root(run_dir)
    return root.is_dir() and (bool(_step_dirs(root)) or (root / LATEST).exists())


def set_aside(run_dir: str | Path) -> Path:
    """Move RUN_DIR/checkpoints to checkpoints.replaced-TIME (nothing is deleted); returns the new place."""
    root = checkpoint_root(run_dir)
    aside = root.with_name(f"{root.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(root, aside)
    root.mkdir()
    return aside


def find_latest(run_dir: str | Path) -> Path | None:
    """The directory ``latest`` names, validated; None when the run has no checkpoint yet."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if not pointer.exists():
        return None
    directory = root / pointer.read_text().strip()
    if not (directory / META).is_file():
        raise CheckpointError(f"{pointer} names {directory}, which is missing or incomplete; point {pointer} "
                              "at a complete step_* directory or delete it to start over")
    return directory


def read_meta(directory: Path) -> dict:
    path = directory / META
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is unreadable ({exc}); the checkpoint is damaged: point "
                              "latest at an earlier step_* directory") from None
    missing = [key for key in META_KEYS if key not in meta] if isinstance(meta, dict) else list(META_KEYS)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it was not written by esolm-train (or is "
                              "damaged): point latest at an earlier step_* directory")
    return meta


META_KEYS = ("step", "layout", "config", "consumed_samples", "tokenizer_vocab", "mask_id")
# Keys whose change makes a checkpoint's tensors another shape: named when a resume does not fit.
MODEL_SHAPE_KEYS = ("num_layers", "hidden_size", "num_heads", "ffn_hidden_size", "vocab_pad_multiple")


def check_fits(meta: dict, directory: Path, model_config: dict) -> None:
    """The checkpoint was written by this model size; otherwise one line naming the keys."""
    saved = meta["config"].get("model", {})
    differing = [f"model.{key}={saved.get(key)} (this run: {model_config[key]})" for key in MODEL_SHAPE_KEYS
                 if saved.get(key) != model_config[key]]
    if differing:
        raise CheckpointError(f"{directory} is of another model size: {', '.join(differing)}; set those keys to the "
                              "checkpoint's values to resume it, or give the new model its own train.run_dir")


def load(engine, directory: Path, topo: Topology) -> dict:
    """Restore the engine in place from a checkpoint of this run's layout (checked first by check_fits
    and layout_change); returns this rank's state. No file can run code."""
    try:
        with weights_only_loads():
            loaded, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    except pickle.UnpicklingError as exc:
        raise refusal(directory, exc) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory} could not be loaded ({str(exc).splitlines()[0][:200]}); the files are "
                              "truncated or corrupt: point latest at an earlier step_* directory") from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no model files in {directory}; point latest at a complete checkpoint")
    return load_rank_state(directory, topo.rank)


def load_rank_state(directory: Path, rank: int) -> dict:
    """What rank ``rank`` of the writing layout kept in rank_XXXXX.pt."""
    rank_path = _rank_file(directory, rank)
    try:
        rank_state = load_file(rank_path)
    except CheckpointError:
        raise  # refused as unsafe: the message says why
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{rank_path} is missing or truncated ({exc.__class__.__name__}); the checkpoint is "
                              "incomplete: point latest at an earlier step_* directory") from None
    return rank_state
