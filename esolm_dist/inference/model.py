"""The exported Eso-LM network in plain torch, with the unified KV cache of paper Alg. 3.

Architecture: design.md "The block" (pre-LN transformer, rotary over the full head dim at each
token's ORIGINAL position, no shift: the output at a position predicts that position's token).
Weight names are exactly the export layout, so `load_state_dict` reads an export as is.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from esolm_dist.inference.export_io import Export, ExportConfig, read_export
from esolm_dist.kernels.attention import attend_after_cache, choose_cached_backend


class KVCache:
    """Keys/values of clean tokens for every layer, in one preallocated buffer (paper Alg. 3).

    Rows [0, length) hold committed tokens. A forward writes its chunk's keys/values to the
    scratch rows [length, length + S), attends over [0, length + S), and then `commit` keeps only
    the chosen chunk rows (Eso-LM caches the tokens decoded one step earlier, never the masks).
    Keys are stored after rotary, so the order of rows carries no meaning.
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 capacity: int, device: torch.device, dtype: torch.dtype):
        shape = (num_layers, batch_size, num_heads, capacity, head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0
        self._chunk_len = 0

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk's keys/values [B, H, S, hd] after the committed rows; return all rows to attend."""
        chunk_len = keys.shape[2]
        end = self.length + chunk_len
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.length} of {self.capacity} rows and cannot take a chunk "
                             f"of {chunk_len}; create it with new_kv_cache(batch_size, capacity >= {end})")
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        self._chunk_len = chunk_len
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def commit(self, chunk_rows: int | torch.Tensor) -> None:
        """Keep the keys/values of the last chunk's rows: an int n keeps its first n rows (they are
        already in place), a tensor ([n] or [B, n], indices in [0, S)) keeps the chosen rows."""
        if isinstance(chunk_rows, int):
            if not 0 <= chunk_rows <= self._chunk_len:
                raise ValueError(f"cannot keep the first {chunk_rows} rows of a chunk of {self._chunk_len}")
            self.length += chunk_rows
            return
        num_layers, batch_size, num_heads, _, head_dim = self.keys.shape
        count = chunk_rows.shape[-1]
        index = chunk_rows.to(self.keys.device).expand(batch_size, count)
        index = index[None, :, None, :, None].expand(num_layers, batch_size, num_heads, count, head_dim)
        start = self.length
        for buffer in (self.keys, self.values):
            chosen = buffer[:, :, :, start:start + self._chunk_len].gather(3, index)
            buffer[:, :, :, start:start + count] = chosen
        self.length += count


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the full head dim, non-interleaved halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """QKV (no bias; rows: all q heads, all k heads, all v heads) -> rotary -> attention -> out."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.out = nn.Linear(hidden_size, hidden_size)

    def forward(self, x, cos, sin, mask, backend: str, kv_cache: KVCache | None, layer: int):
        batch, seq, hidden = x.shape
        qkv = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        (q, k), v = _rotate(qkv[:2], cos, sin), qkv[2]
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
        self.mask_token_id = config.mask_token_id
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_ln = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        half = config.head_dim // 2
        inv_freq = config.rotary_base ** (-torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        never_sampled = torch.zeros(config.vocab_size, dtype=torch.bool)
        never_sampled[config.mask_token_id] = True
        never_sampled[num_tokenizer_tokens or config.vocab_size:] = True
        logit_bias = torch.zeros(config.vocab_size).masked_fill(never_sampled, float("-inf"))
        self.register_buffer("logit_bias", logit_bias, persistent=False)

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

    def new_kv_cache(self, batch_size: int, capacity: int) -> KVCache:
        c = self.config
        return KVCache(c.num_layers, batch_size, c.num_heads, c.head_dim, capacity,
                       self.head.weight.device, self.head.weight.dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn_mask: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_append: int | torch.Tensor | None = None,
                logits_rows: slice | None = None) -> torch.Tensor:
        """Logits [B, S', V] for tokens [B, S] at original positions [B, S].

        attn_mask: bool [B or 1, S, S_kv] (True = attend, S_kv = cached rows + S); by default
          causal over the chunk, after all cached rows.
        kv_cache: attend to its rows too; cache_append: the chunk rows whose keys/values the cache
          keeps after this call (int n: the first n rows; tensor [n] or [B, n]: those rows;
          None: none).
        logits_rows: the rows of the chunk to project to the vocabulary (default all, S' = S).
        The mask token and padded ids get logit -inf.
        """
        cached = kv_cache.length if kv_cache is not None else 0
        mask = self._attention_mask(attn_mask, tokens.shape[1], cached)
        angles = positions.to(self.inv_freq.dtype)[:, None, :, None] * self.inv_freq
        dtype = self.head.weight.dtype
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
        x = self.embed(tokens)
        self.attention_backend = choose_cached_backend(x, mask)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, mask, self.attention_backend, kv_cache, layer)
        if cache_append is not None:
            kv_cache.commit(cache_append)
        if logits_rows is not None:
            x = x[:, logits_rows]
        return self.head(self.final_ln(x)) + self.logit_bias

    @staticmethod
    def _attention_mask(attn_mask: torch.Tensor | None, seq_len: int, cached: int) -> torch.Tensor | None:
        """The attention dispatch's mask [B or 1, 1, S, S_kv]; None = all cached rows + causal chunk."""
        if attn_mask is None:
            return None
        if attn_mask.shape[-2:] != (seq_len, cached + seq_len):
            raise ValueError(f"attn_mask has shape {list(attn_mask.shape)}, expected "
                             f"[B or 1, {seq_len}, {cached + seq_len}] (chunk x cached+chunk)")
        return attn_mask[:, None]
