"""The authors' PyTorch Lightning ``.ckpt`` files, read without running code from them, and written.

A released checkpoint is a torch zip file. Besides tensors and plain containers its pickle holds
what Lightning's ``save_hyperparameters`` keeps of the training module's arguments: the run's
OmegaConf ``DictConfig`` and the Hugging Face GPT-2 tokenizer object. torch's weights-only
unpickler reads it with exactly those class names bound to inert records: rebuilding one only
keeps its pickled state (no code of omegaconf, transformers or tokenizers runs, and none of them
needs to be installed); any other global is refused with one line.

Keys used: ``state_dict`` (the DiT under ``backbone.``), ``ema`` (``shadow_params``, in the order
of the backbone's parameters), ``hyper_parameters`` (``config``, ``tokenizer``), ``global_step``.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import typing
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from esolm_dist.errors import CheckpointError
from esolm_dist.safe_load import refusal

BACKBONE_PREFIX = "backbone."
LIGHTNING_VERSION = "2.5.0.post0"  # the version s-sahoo/Eso-LMs pins
ONLY_RELEASED = "import only the Eso-LM authors' Lightning checkpoints"


class _Record:
    """An object of an allowlisted class, kept as the arguments and state it was pickled with."""

    def __new__(cls, *args):
        record = super().__new__(cls)
        record.args, record.state = args, None
        return record

    def __setstate__(self, state):
        self.state = state


class _DictConfig(_Record):
    """omegaconf DictConfig: state ``_content`` is {key: node}, or None / a string (interpolation, "???")."""


class _ListConfig(_Record):
    """omegaconf ListConfig: state ``_content`` is [node, ...]."""


class _ValueNode(_Record):
    """omegaconf leaf node: state ``_val`` is the value."""


class _Opaque(_Record):
    """Kept only as pickled state: OmegaConf metadata, the tokenizer and its parts."""


def _plain_dict(*_):
    """collections.defaultdict(factory) read as a plain dict (only OmegaConf's empty resolver caches)."""
    return {}


_ALLOWED: dict[str, object] = {
    "omegaconf.dictconfig.DictConfig": _DictConfig,
    "omegaconf.listconfig.ListConfig": _ListConfig,
    **{f"omegaconf.nodes.{name}": _ValueNode
       for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode")},
    "omegaconf.base.Metadata": _Opaque,
    "omegaconf.base.ContainerMetadata": _Opaque,
    "transformers.models.gpt2.tokenization_gpt2_fast.GPT2TokenizerFast": _Opaque,
    "tokenizers.Tokenizer": _Opaque,
    "tokenizers.models.Model": _Opaque,
    "tokenizers.AddedToken": _Opaque,
    "collections.defaultdict": _plain_dict,
    "typing.Any": typing.Any,
    **{f"builtins.{kind.__name__}": kind for kind in (dict, list, tuple, int, float, str, bool)},
}


def load_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint's top-level dict (tensors memory-mapped, allowlisted objects as records)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; pass the .ckpt file of a released Eso-LM checkpoint")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is not a PyTorch zip checkpoint (truncated, or another format); "
                              "download the .ckpt again")
    try:
        with torch.serialization.safe_globals([(obj, name) for name, obj in _ALLOWED.items()]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise refusal(path, exc, ONLY_RELEASED) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is truncated or corrupt ({exc.__class__.__name__}); download the .ckpt "
                              "again") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and any(str(k).startswith(BACKBONE_PREFIX) for k in checkpoint["state_dict"])):
        raise CheckpointError(f"{path} is not an Eso-LM Lightning checkpoint (no state_dict with {BACKBONE_PREFIX}* "
                              "weights); pass a .ckpt written by s-sahoo/Eso-LMs or by `esolm-convert export "
                              "--format reference`")
    return checkpoint


def backbone_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The DiT's tensors, without the ``backbone.`` prefix."""
    return {k[len(BACKBONE_PREFIX):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(BACKBONE_PREFIX)}


def plain(value):
    """OmegaConf records -> plain dicts, lists and values (an interpolation stays its string)."""
    if isinstance(value, (_DictConfig, _ListConfig)):
        content = value.state["_content"]
        return content if content is None or isinstance(content, str) else plain(content)
    if isinstance(value, _ValueNode):
        return plain(value.state["_val"])
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def run_config(checkpoint: dict, path: Path) -> dict:
    """The run's config as plain dicts ({} when the checkpoint stores none)."""
    hyper = checkpoint.get("hyper_parameters") or {}
    try:
        hyper = plain(hyper)
    except (KeyError, TypeError, AttributeError):
        raise CheckpointError(f"{path}: hyper_parameters hold an unreadable OmegaConf config; pass the dimensions "
                              "as flags (--num-heads, --seq-len, --variant, --alpha0)") from None
    config = hyper.get("config", hyper) if isinstance(hyper, dict) else {}
    return config if isinstance(config, dict) else {}


def stored_vocabulary(checkpoint: dict) -> dict[str, int] | None:
    """token -> id of the BPE model of the tokenizer object Lightning stored, when there is one.

    The transformers tokenizer pickles its attributes; its ``_tokenizer`` (a ``tokenizers.Tokenizer``)
    pickles as the tokenizer's JSON."""
    hyper = checkpoint.get("hyper_parameters")
    tokenizer = hyper.get("tokenizer") if isinstance(hyper, dict) else None
    backend = tokenizer.state.get("_tokenizer") if isinstance(tokenizer, _Record) and isinstance(
        tokenizer.state, dict) else None
    if not (isinstance(backend, _Record) and isinstance(backend.state, (bytes, str))):
        return None
    try:
        vocab = json.loads(backend.state)["model"]["vocab"]
    except (ValueError, KeyError, TypeError):
        return None
    return vocab if isinstance(vocab, dict) else None


def write_lightning_checkpoint(path: str | Path, backbone: dict[str, torch.Tensor], parameter_names: list[str],
                               config: dict, overwrite: bool = False) -> Path:
    """A checkpoint the reference code's ``load_from_checkpoint`` reads: the backbone in ``state_dict``
    and, equal to it, in ``ema.shadow_params`` (its ``on_load_checkpoint`` needs ``ema`` and the
    fit-loop counters); only plain data, so ``torch.load(weights_only=True)`` reads it too.
    Written to a temporary file in the same folder and renamed into place."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists; choose a new file or pass --overwrite")
    progress = {"current": {"completed": 0}, "total": {"completed": 0}}
    checkpoint = {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": LIGHTNING_VERSION,
        "state_dict": OrderedDict((BACKBONE_PREFIX + name, tensor) for name, tensor in backbone.items()),
        "loops": {"fit_loop": {"epoch_progress": progress, "epoch_loop.batch_progress": progress}},
        "callbacks": {}, "optimizer_states": [], "lr_schedulers": [],
        "hparams_name": "kwargs", "hyper_parameters": {"config": config},
        "ema": {"decay": 0.9999, "num_updates": 0, "shadow_params": [backbone[name] for name in parameter_names]},
        "sampler": {"random_state": None},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        torch.save(checkpoint, staging)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
