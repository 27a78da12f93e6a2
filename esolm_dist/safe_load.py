"""Checkpoint files are read without running code from them.

A ``.pt`` file is a pickle, and unpickling can call any function the file names. Every load of
checkpoint data goes through :func:`weights_only_loads`: inside it, each ``torch.load`` (ours and
DeepSpeed's, which asks for ``weights_only=False``) is forced to torch's weights-only unpickler
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``), which rebuilds tensors, containers and numbers and refuses
any other global except the short allowlist of plain data classes DeepSpeed stores in its
optimizer files. A file that needs anything else is refused with one line naming it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from esolm_dist.errors import CheckpointError

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects other than tensors and plain data."""


def _deepspeed_data_classes() -> list[type]:
    """The non-tensor objects DeepSpeed pickles into ZeRO optimizer files: attribute holders that
    run no code when rebuilt (checked: their classes define no __setstate__ / __reduce__ logic)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


ONLY_OURS = "only load checkpoints written by esolm-train, and share weights as exports (safetensors)"


def refusal(path: str | Path, exc: pickle.UnpicklingError, advice: str = ONLY_OURS) -> UnsafeCheckpointError:
    """One line naming the file, what it asked to run, and `advice`."""
    found = re.search(r"GLOBAL (\S+)", str(exc)) or re.search(r"(Unsupported operand \S+)", str(exc))
    what = found.group(1) if found else str(exc).splitlines()[0][:120]
    return UnsafeCheckpointError(f"refusing to load {path}: it asks to run or build {what}, which is not checkpoint "
                                 f"data (loading it could execute code); {advice}")


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside is weights-only, with DeepSpeed's plain data classes allowed."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_data_classes()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def load_file(path: str | Path):
    """``torch.load`` of one checkpoint file on the CPU, weights only; a pickle that would run code
    raises UnsafeCheckpointError (other failures propagate: the caller names them)."""
    with weights_only_loads():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise refusal(path, exc) from None
