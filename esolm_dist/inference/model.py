"""The exported Eso-LM network in plain torch, with the unified KV cache of paper Alg. 3
(esolm_dist.inference.kv_cache).

Architecture: design.md "The block" (pre-LN transformer, rotary over the full head dim at each
token's ORIGINAL position, no shift: the output at a position predicts that position's token).
Weight names are exactly the export layout, so `load_state_dict` reads an export as is.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from esolm_dist.inference.cuda_graphs import StepGraphs
from esolm_dist.inference.export_io import Export, ExportConfig, read_export
from esolm_dist.inference.kv_cache import KVCache, StaticKVCache, checked_mask
from esolm_dist.kernels.attention import attend_after_cache, cached_chunk_mask, choose_cached_backend
from esolm_dist.model.rotary import angle_tables, apply_rotary, inverse_frequencies


class Attention(nn.Module):
    """QKV (no bias; rows: all q heads, all k heads, all v heads) -> rotary -> attention -> out."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, cos, sin, mask, backend: str, kv_cache: KVCache | StaticKVCache | None, layer: int):
        batch, seq, hidden = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        (q, k), v = apply_rotary(qkv[:2], cos, sin), qkv[2]  # in fp32, as in training
        if kv_cache is not None:
            k, v = kv_cache.extend(layer, k, v)
        y = attend_after_cache(q, k, v, mask, backend)
        return self.out(y.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, hidden_size: int, ffn_hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, ffn_hidden_size)
        self.fc2 = nn.Linear(ffn_hidden_size, hidden_size)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, config: ExportConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.attn = Attention(config.hidden_size, config.num_heads)
        self.ln2 = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.mlp = MLP(config.hidden_size, config.ffn_hidden_size)

    def forward(self, x, cos, sin, mask, backend, kv_cache, layer):
        x = x + self.attn(self.ln1(x), cos, sin, mask, backend, kv_cache, layer)
        return x + self.mlp(self.ln2(x))


class EsoLM(nn.Module):
    """The Eso-LM denoiser: tokens at given original positions -> logits for those positions."""

    def __init__(self, config: ExportConfig, num_tokenizer_tokens: int | None = None):
        super().__init__()
        self.config = config
        self.attention_backend = ""  # the kernel of the last forward (esolm_dist.kernels.attention)
        # new_kv_cache's layout: False = KVCache (fastest eagerly, CPU); True = StaticKVCache, whose
        # steps are CUDA graphs on a GPU (off by default: not yet measured on one)
        self.static_kv_cache = False
        self.mask_token_id = config.mask_token_id
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        never_sampled = torch.zeros(config.vocab_size, dtype=torch.bool)
        never_sampled[config.mask_token_id] = True
        never_sampled[num_tokenizer_tokens or config.vocab_size:] = True
        logit_bias = torch.zeros(config.vocab_size).masked_fill(never_sampled, float("-inf"))
        self.register_buffer("logit_bias", logit_bias, persistent=False)
        # not a buffer: model.to(dtype) must not round it (rotary runs in fp32, as in training)
        self._inv_freq = inverse_frequencies(config.head_dim, config.rotary_base)

    @classmethod
    def from_export(cls, export: Export, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None) -> EsoLM:
        """The network of a validated export, in eval mode, on `device` in `dtype` (default: config's)."""
        model = cls(export.config, export.tokenizer.get_vocab_size())
        model.load_state_dict(export.state_dict)
        return model.to(device=device or "cpu", dtype=dtype or export.config.torch_dtype).eval()

    @classmethod
    def from_pretrained(cls, export_dir: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> EsoLM:
        return cls.from_export(read_export(export_dir), device, dtype)

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache | StaticKVCache:
        c, device, dtype = self.config, self.head.weight.device, self.head.weight.dtype
        shape = (c.num_layers, batch_size, c.num_heads, c.head_dim, capacity, device, dtype)
        if not self.static_kv_cache:
            return KVCache(*shape)
        return StaticKVCache(*shape, graphs=StepGraphs(device) if device.type == "cuda" else None)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | StaticKVCache | None = None, cache_append: int | torch.Tensor | None = None,
                logits_rows: slice | None = None) -> torch.Tensor:
        """Logits [B, S', V] for tokens [B, S] at original positions [B, S].

        attn_mask: bool [B or 1, S, S_kv] (True = attend, S_kv = cached rows + S); by default
          causal over the chunk, after all cached rows.
        kv_cache: attend to its rows too; cache_append: the chunk rows whose keys/values the cache
          keeps after this call (int n: the first n rows; tensor [n] or [B, n]: those rows;
          None: none).
        logits_rows: the rows of the chunk to project to the vocabulary (default all, S' = S).
        The mask token and padded ids get logit -inf.
        With a cache that has ``graphs`` and no attn_mask, the step runs as a CUDA graph and the
        logits are its output buffer, valid until the next step of the same shape.
        """
        if kv_cache is not None:
            kv_cache.begin_chunk(tokens.shape[1])
        if kv_cache is not None and kv_cache.graphs is not None and attn_mask is None:
            rows = logits_rows or slice(None)
            key = (*tokens.shape, rows.start, rows.stop, rows.step)
            logits = kv_cache.graphs(key, lambda t, p: self._logits(t, p, None, kv_cache, logits_rows),
                                     tokens, positions)
        else:
            logits = self._logits(tokens, positions, attn_mask, kv_cache, logits_rows)
        if cache_append is not None:
            kv_cache.commit(cache_append)
        return logits

    def _logits(self, tokens, positions, attn_mask, kv_cache, logits_rows) -> torch.Tensor:
        """The network (forward without the cache's commit): what a CUDA graph captures."""
        seq_len = tokens.shape[1]
        if kv_cache is None:
            mask = checked_mask(attn_mask, seq_len, 0)
        else:
            mask = kv_cache.attention_mask(attn_mask, seq_len)
        cos, sin = self._rotary_tables(positions)
        x = self.embed(tokens)
        self.attention_backend = choose_cached_backend(x, mask)
        if mask is None and self.attention_backend == "sdpa":  # built once here, not in every layer
            cached = kv_cache.length if kv_cache is not None else 0
            mask = cached_chunk_mask(seq_len, cached + seq_len, x.device)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, self.attention_backend, kv_cache, layer)
        if logits_rows is not None:
            x = x[:, logits_rows]
        return self.head(self.final_ln(x)) + self.logit_bias

    def _rotary_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin [B, 1, S, head_dim / 2] (the frequencies move to the positions' device once)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        return angle_tables(positions, self._inv_freq)
