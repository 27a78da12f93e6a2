"""Read and write the `esolm-export-v1` folder: model.safetensors, config.json, tokenizer.json,
README.md (design.md "Checkpoints"; weights in the layout of design.md "The block").

Every problem is reported as one ExportError line that names the file and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from esolm_dist.eso import MODELS, model_alpha0

EXPORT_FORMAT = "esolm-export-v1"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
CARD_FILE = "README.md"
MASK_TOKEN = "[MASK]"
EOS_TOKEN = "<|endoftext|>"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REGENERATE = "re-run esolm-convert to rebuild the export"
_OPTIONAL_KEYS = {"model": "esolm", "block_size": 1}  # absent from exports written before the baselines


# The model card's line naming the MLflow run that trained the model (esolm-eval links its run to it)
_TRAINING_RUN_LINE = re.compile(r"^MLflow training run: `(?P<run_id>[0-9a-f]+)` in `(?P<uri>[^`]+)`\.$", re.MULTILINE)


class ExportError(ValueError):
    """A one-line problem with an export folder: which file, what is wrong, how to fix it."""


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """config.json of an export, validated: the network shape and the Eso-LM settings."""

    format: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_hidden_size: int
    rotary_base: float
    layernorm_eps: float
    mask_token_id: int
    eos_token_id: int
    max_seq_len: int
    variant: str
    alpha0: float
    dtype: str
    model: str = "esolm"  # esolm | ar | mdlm | bd3lm (eso.model); exports written before it are Eso-LMs
    block_size: int = 1  # L' of a bd3lm export

    @property
    def bos_token_id(self) -> int:
        """The AR baseline's first input (the EOS id, as in GPT-2)."""
        return self.eos_token_id

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping, source: str) -> ExportConfig:
        """Check keys, JSON types and values of `raw`; `source` names the file in errors."""
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        raw = {**_OPTIONAL_KEYS, **raw}
        missing = [name for name in fields if name not in raw]
        if missing:
            raise ExportError(f"{source}: missing key(s) {missing}; {_REGENERATE}")
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            raise ExportError(f"{source}: unknown key(s) {unknown}; remove them ({EXPORT_FORMAT} has none)")
        values = {name: _checked_json_value(raw[name], kind, name, source) for name, kind in fields.items()}
        config = cls(**values)
        config._check_values(source)
        return config

    def _check_values(self, source: str) -> None:
        problems = []
        if self.format != EXPORT_FORMAT:
            problems.append(f'"format" is {self.format!r}, this reader needs {EXPORT_FORMAT!r}')
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "ffn_hidden_size", "max_seq_len"):
            if getattr(self, name) <= 0:
                problems.append(f'"{name}" must be positive')
        if self.num_heads > 0 and (self.hidden_size % self.num_heads or self.head_dim % 2):
            problems.append('"hidden_size" / "num_heads" must be an even integer (rotary halves)')
        for name in ("mask_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                problems.append(f'"{name}" must lie in [0, vocab_size)')
        if self.model not in MODELS:
            problems.append(f'"model" must be one of {list(MODELS)}')
        if self.block_size < 1 or self.max_seq_len % max(self.block_size, 1):
            problems.append('"block_size" must be positive and divide "max_seq_len"')
        if self.variant not in ("A", "B"):
            problems.append('"variant" must be "A" or "B"')
        if not 0.0 <= self.alpha0 <= 1.0:
            problems.append('"alpha0" must lie in [0, 1]')
        if self.dtype not in DTYPES:
            problems.append(f'"dtype" must be one of {sorted(DTYPES)}')
        if self.rotary_base <= 0 or self.layernorm_eps <= 0:
            problems.append('"rotary_base" and "layernorm_eps" must be positive')
        if problems:
            raise ExportError(f"{source}: {'; '.join(problems)}; fix the value(s) or {_REGENERATE}")


def _checked_json_value(value, kind: str, name: str, source: str):
    """A JSON value of the declared field type (ints are accepted for float fields)."""
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind == "str" and isinstance(value, str):
        return value
    raise ExportError(f'{source}: "{name}" is {value!r}, expected a JSON {kind}; fix the value or {_REGENERATE}')


def expected_tensor_shapes(config: ExportConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every weight of the export (design.md "The block")."""
    d, f, V = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    shapes = {"embed.weight": (V, d)}
    for i in range(config.num_layers):
        p = f"blocks.{i}."
        shapes.update({
            p + "ln1.weight": (d,), p + "ln1.bias": (d,),
            p + "attn.qkv.weight": (3 * d, d),
            p + "attn.out.weight": (d, d), p + "attn.out.bias": (d,),
            p + "ln2.weight": (d,), p + "ln2.bias": (d,),
            p + "mlp.fc1.weight": (f, d), p + "mlp.fc1.bias": (f,),
            p + "mlp.fc2.weight": (d, f), p + "mlp.fc2.bias": (d,),
        })
    shapes.update({"final_ln.weight": (d,), "final_ln.bias": (d,), "head.weight": (V, d), "head.bias": (V,)})
    return shapes


def check_tensors(config: ExportConfig, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                  source: str) -> None:
    """Names, shapes and dtypes of `tensors` (name -> (shape, dtype)) against the config."""
    expected = expected_tensor_shapes(config)
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ExportError(f"{source}: missing tensor(s) {_first(missing)}; {_REGENERATE}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ExportError(f"{source}: unexpected tensor(s) {_first(extra)}; {_REGENERATE} "
                          f"(the export holds exactly the layout of design.md 'The block')")
    for name, shape in expected.items():
        got_shape, got_dtype = tensors[name]
        if tuple(got_shape) != shape:
            raise ExportError(f"{source}: tensor {name} has shape {list(got_shape)}, config.json implies "
                              f"{list(shape)}; make config.json and the weights agree ({_REGENERATE})")
        if got_dtype != config.torch_dtype:
            raise ExportError(f'{source}: tensor {name} is {got_dtype}, config.json says "dtype": '
                              f'"{config.dtype}"; make them agree ({_REGENERATE})')


def check_tokenizer(config: ExportConfig, tokenizer: Tokenizer, source: str) -> None:
    """The special tokens sit at the config's ids and the tokenizer fits inside vocab_size."""
    for token, key in ((MASK_TOKEN, "mask_token_id"), (EOS_TOKEN, "eos_token_id")):
        token_id = tokenizer.token_to_id(token)
        if token_id != getattr(config, key):
            raise ExportError(f'{source}: {token} has id {token_id}, config.json "{key}" is '
                              f"{getattr(config, key)}; use the tokenizer the model was trained with")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ExportError(f"{source}: {tokenizer.get_vocab_size()} tokens exceed config.json vocab_size "
                          f"{config.vocab_size}; use the tokenizer the model was trained with")


def _first(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


@dataclasses.dataclass
class Export:
    """A validated export folder, loaded: config, weights (CPU) and tokenizer."""

    path: Path
    config: ExportConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: Tokenizer


def read_export(export_dir: str | os.PathLike) -> Export:
    """Load and validate an export folder; raise ExportError (one line) on any problem."""
    root = Path(export_dir)
    config, tokenizer = read_export_metadata(root)
    return Export(root, config, _read_weights(root / WEIGHTS_FILE, config), tokenizer)


def read_export_metadata(export_dir: str | os.PathLike) -> tuple[ExportConfig, Tokenizer]:
    """An export folder's config and tokenizer, validated, without reading its weights (a warm start
    reads each rank's slice of model.safetensors itself)."""
    root = Path(export_dir)
    if not root.is_dir():
        raise ExportError(f"{root}: not a directory; pass the export folder written by esolm-convert")
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, CARD_FILE):
        if not (root / name).is_file():
            raise ExportError(f"{root / name}: missing file; {_REGENERATE} (an export holds "
                              f"{WEIGHTS_FILE}, {CONFIG_FILE}, {TOKENIZER_FILE}, {CARD_FILE})")
    config = _read_config(root / CONFIG_FILE)
    return config, _read_tokenizer(root / TOKENIZER_FILE, config)


def _read_config(path: Path) -> ExportConfig:
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({str(err).splitlines()[0]}); {_REGENERATE}") from None
    if not isinstance(raw, dict):
        raise ExportError(f"{path}: expected a JSON object; {_REGENERATE}")
    return ExportConfig.from_dict(raw, str(path))


def _read_weights(path: Path, config: ExportConfig) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except SafetensorError as err:
        raise ExportError(f"{path}: unreadable or truncated safetensors ({str(err).splitlines()[0]}); "
                          f"copy the file again or {_REGENERATE}") from None
    check_tensors(config, {n: (t.shape, t.dtype) for n, t in tensors.items()}, str(path))
    return tensors


def _read_tokenizer(path: Path, config: ExportConfig) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # the tokenizers library raises a bare Exception on bad files
        raise ExportError(f"{path}: not a tokenizers JSON file ({str(err).splitlines()[0]}); "
                          f"{_REGENERATE}") from None
    check_tokenizer(config, tokenizer, str(path))
    return tokenizer


def write_export(export_dir: str | os.PathLike, config: ExportConfig | Mapping,
                 state_dict: Mapping[str, torch.Tensor], tokenizer_path: str | os.PathLike,
                 card_text: str, *, overwrite: bool = False) -> Path:
    """Validate, then write an export folder atomically: a temporary sibling folder is filled
    and renamed into place, so readers never see a half-written export. Folder and files get the
    modes of the umask (0755 / 0644 under umask 022), like any folder the user makes."""
    root = Path(export_dir)
    target_weights = str(root / WEIGHTS_FILE)
    if not isinstance(config, ExportConfig):
        config = ExportConfig.from_dict(config, f"config for {root / CONFIG_FILE}")
    check_tensors(config, {n: (t.shape, t.dtype) for n, t in state_dict.items()}, target_weights)
    tokenizer_path = Path(tokenizer_path)
    _read_tokenizer(tokenizer_path, config)
    if root.exists() and not overwrite:
        raise ExportError(f"{root}: already exists; choose a new folder or pass overwrite=True")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.{secrets.token_hex(4)}.tmp"
    staging.mkdir()  # not tempfile.mkdtemp: that makes the folder 0700 whatever the umask
    try:
        weights = {name: tensor.detach().to("cpu").contiguous() for name, tensor in state_dict.items()}
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        save_file(weights, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        # safetensors writes 0600: give the weights the mode open() gave config.json (from the umask)
        shutil.copymode(staging / CONFIG_FILE, staging / WEIGHTS_FILE)
        shutil.copyfile(tokenizer_path, staging / TOKENIZER_FILE)
        (staging / CARD_FILE).write_text(card_text)
        _swap_into_place(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root


def _swap_into_place(staging: Path, root: Path) -> None:
    """Rename `staging` to `root`; an existing `root` is moved aside first and removed after."""
    if not root.exists():
        os.rename(staging, root)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".old", dir=root.parent))
    os.rename(root, retired / root.name)
    os.rename(staging, root)
    shutil.rmtree(retired)


def export_config(meta: dict, weights: dict[str, torch.Tensor], tokenizer, dtype: str) -> ExportConfig:
    """The export config of a training checkpoint's meta (esolm_dist.checkpoint) and its reference-layout weights."""
    m, e = meta["config"]["model"], meta["config"]["eso"]
    return ExportConfig.from_dict({
        "format": "esolm-export-v1", "vocab_size": int(weights["embed.weight"].shape[0]),
        "hidden_size": m["hidden_size"], "num_layers": m["num_layers"], "num_heads": m["num_heads"],
        "ffn_hidden_size": m["ffn_hidden_size"] or 4 * m["hidden_size"], "rotary_base": float(m["rotary_base"]),
        "layernorm_eps": float(m["layernorm_eps"]), "mask_token_id": meta["mask_id"],
        "eos_token_id": tokenizer.eos_id, "max_seq_len": m["seq_len"], "variant": e["variant"],
        "alpha0": model_alpha0(e.get("model", "esolm"), e["alpha0"]), "dtype": dtype, "model": e.get("model", "esolm"),
        "block_size": e.get("block_size", 1) if e.get("model") == "bd3lm" else 1,
    }, "the checkpoint's config")


def training_run_card_line(run_id: str, tracking_uri: str) -> str:
    """The model card's line naming the training run (read back by read_training_run)."""
    return f"MLflow training run: `{run_id}` in `{tracking_uri}`."


def read_training_run(export_dir: str | os.PathLike) -> tuple[str, str] | None:
    """(run id, tracking URI) of the MLflow run that trained the export, from its model card; None
    for exports written without one (imports, exports from before this line existed)."""
    match = _TRAINING_RUN_LINE.search((Path(export_dir) / CARD_FILE).read_text())
    return (match["run_id"], match["uri"]) if match else None
