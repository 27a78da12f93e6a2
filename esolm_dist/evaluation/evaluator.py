"""The causal LM that scores samples: a transformers model name (downloaded once into the Hugging Face
cache) or a local folder (read with local_files_only, never the network).

An evaluator is anything with the attributes and the method of `Evaluator`; gen_ppl needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch


class Evaluator(Protocol):
    context_len: int      # the most tokens one forward scores (longer samples are cut into chunks)
    bos_id: int | None    # put before every sample so that its first token is scored too; None: not scored
    eos_id: int | None    # appended to a sample that ended (had an EOS)

    def encode(self, text: str) -> list[int]: ...

    def chunk_nll(self, chunks: list[list[int]]) -> list[float]:
        """Per chunk: sum over its tokens 1.. of -log p(token | the chunk's tokens before it)."""
        ...


class CausalLMEvaluator:
    """A transformers causal LM (default gpt2-large, as the paper) in float32, scoring `batch_size`
    chunks per forward."""

    def __init__(self, name_or_dir: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        local = Path(name_or_dir).is_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_dir, local_files_only=local)
        self.model = AutoModelForCausalLM.from_pretrained(name_or_dir, local_files_only=local,
                                                          dtype=torch.float32).to(device).eval()
        config = self.model.config
        self.context_len = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        self.eos_id = self.tokenizer.eos_token_id
        # GPT-2 has no separate BOS: its <|endoftext|> starts documents in training
        self.bos_id = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos_id
        self.device = device
        self.batch_size = batch_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def chunk_nll(self, chunks: list[list[int]]) -> list[float]:
        sums = []
        for start in range(0, len(chunks), self.batch_size):
            batch = chunks[start:start + self.batch_size]
            width = max(len(chunk) for chunk in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            valid = torch.zeros(len(batch), width, dtype=torch.bool)
            for row, chunk in enumerate(batch):  # right padding: positions 0.. stay those of the chunk
                ids[row, :len(chunk)] = torch.tensor(chunk)
                valid[row, :len(chunk)] = True
            ids, valid = ids.to(self.device), valid.to(self.device)
            logits = self.model(input_ids=ids, attention_mask=valid.long()).logits.float()
            nll = -logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            sums.extend(nll.double().masked_fill(~valid[:, 1:], 0.0).sum(dim=1).tolist())
        return sums


class ArExportEvaluator:
    """An esolm-dist `ar` export as the evaluator: the shift-by-one causal LM of eso.model=ar (input
    position i holds the token before target i, the EOS standing in as BOS), with its own tokenizer.
    A chunk of up to max_seq_len + 1 tokens is one forward of its first max_seq_len tokens."""

    def __init__(self, export_dir: str, device: str = "cpu", batch_size: int = 16):
        from esolm_dist.inference.export_io import read_export
        from esolm_dist.inference.model import EsoLM

        export = read_export(export_dir)
        if export.config.model != "ar":
            raise ValueError(f"{export_dir} is an {export.config.model} export; an evaluator export must be "
                             "eso.model=ar")
        self.tokenizer = export.tokenizer
        self.model = EsoLM.from_export(export, device, torch.float32).eval()
        self.context_len = export.config.max_seq_len + 1
        self.bos_id = self.eos_id = export.config.eos_token_id
        self.device = device
        self.batch_size = batch_size

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    @torch.inference_mode()
    def chunk_nll(self, chunks: list[list[int]]) -> list[float]:
        sums = []
        for chunk in chunks:  # one chunk per forward: the default causal mask, no padding
            ids = torch.tensor(chunk, device=self.device)
            inputs, targets = ids[None, :-1], ids[1:]
            positions = torch.arange(inputs.shape[1], device=self.device)[None]
            logits = self.model(inputs, positions).float()[0]
            sums.append(float(-logits.log_softmax(-1).gather(-1, targets[:, None]).double().sum()))
        return sums


def is_esolm_export(path: str) -> bool:
    """Whether ``path`` is an esolm-dist export folder (its config.json) rather than a transformers model."""
    from esolm_dist.inference.export_io import CONFIG_FILE

    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        return False
    import json

    return json.loads((folder / CONFIG_FILE).read_text()).get("format", "").startswith("esolm-export")
