"""Atomic training checkpoints: DeepSpeed's state plus ours, a ``latest`` pointer moved last.

Layout of ``RUN_DIR/checkpoints``::

    step_00000200/            DeepSpeed model + optimizer (ZeRO partitions) files
        rank_00000.pt         this rank's RNG states, data-reader state, EMA shard
        esolm.json            step, consumed samples, layout, config, MLflow run id
    latest                    "step_00000200", replaced atomically after a complete save

A save goes to ``step_N.partial`` and is renamed only after every rank has finished, so a
crash mid-save never leaves a directory that ``latest`` points to or that resume accepts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from esolm_dist.parallel.state import Topology

LATEST = "latest"
META = "esolm.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or from another layout; the message names the file and the fix."""


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
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rank_file(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank:05d}.pt"


def layout_of(topo: Topology) -> dict:
    return {"tensor": topo.tp_size, "pipeline": topo.pp_size, "data": topo.dp_size}


def save(engine, run_dir: str | Path, step: int, meta: dict, rank_state: dict, topo: Topology,
         keep_last: int) -> Path:
    """Save on every rank; returns the final directory. ``meta`` is written by rank 0."""
    root = checkpoint_root(run_dir)
    final = root / tag_for(step)
    partial_tag = tag_for(step) + ".partial"
    engine.save_checkpoint(str(root), tag=partial_tag, save_latest=False)
    partial = root / partial_tag
    rank_tmp = _rank_file(partial, topo.rank).with_suffix(".tmp")
    torch.save(rank_state, rank_tmp)
    os.replace(rank_tmp, _rank_file(partial, topo.rank))
    dist.barrier()
    if topo.rank == 0:
        _atomic_write_text(partial / META, json.dumps({**meta, "step": step, "layout": layout_of(topo),
                                                       "world_size": topo.world_size}, indent=2))
        if final.exists():  # a save of the same step from an earlier, interrupted attempt
            shutil.rmtree(final)
        os.replace(partial, final)
        _atomic_write_text(root / LATEST, final.name)
        _prune(root, keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


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
    try:
        return json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{directory / META} is unreadable ({exc}); the checkpoint is damaged: point "
                              "latest at an earlier step_* directory") from None


def load(engine, directory: Path, topo: Topology) -> tuple[dict, dict]:
    """Restore the engine in place; returns (meta, this rank's state)."""
    meta = read_meta(directory)
    if meta["layout"] != layout_of(topo):
        raise CheckpointError(f"{directory} was written with layout {meta['layout']} but this run uses "
                              f"{layout_of(topo)}; resume with the same parallel layout (tools/convert.py "
                              "exports to any layout)")
    try:
        loaded, _ = engine.load_checkpoint(str(directory.parent), tag=directory.name, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{directory} could not be loaded ({str(exc).splitlines()[0][:200]}); the files are "
                              "truncated or corrupt: point latest at an earlier step_* directory") from None
    if loaded is None:
        raise CheckpointError(f"DeepSpeed found no model files in {directory}; point latest at a complete checkpoint")
    rank_path = _rank_file(directory, topo.rank)
    try:
        rank_state = torch.load(rank_path, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError) as exc:
        raise CheckpointError(f"{rank_path} is missing or truncated ({exc.__class__.__name__}); the checkpoint is "
                              "incomplete: point latest at an earlier step_* directory") from None
    return meta, rank_state
