"""The unified KV cache of paper Alg. 3: keys/values of clean tokens for every layer, one buffer.

Both layouts preallocate [layers, B, heads, capacity, head_dim] and hold the committed tokens in
rows [0, length). A forward writes its chunk's keys/values after them (rows [length, length + S)),
attends, and ``commit`` then keeps the chosen chunk rows (Eso-LM caches the tokens decoded one
step earlier, never the masks). Keys are stored after rotary, so the order of rows carries no
meaning.

- :class:`KVCache` attends over the rows in use, [0, length + S): its shapes grow every step.
  The fastest eager path (CPU).
- :class:`StaticKVCache` attends over all ``capacity`` rows with a mask of the rows in use and
  writes at a row counter held on the device, so a step's shapes depend only on its chunk: on
  CUDA each chunk shape is captured once as a CUDA graph and replayed (``graphs``).
"""

from __future__ import annotations

import torch

from esolm_dist.eso.masks import diffusion_allowed
from esolm_dist.inference.cuda_graphs import StepGraphs


def checked_mask(attn_mask: torch.Tensor | None, seq_len: int, cached: int) -> torch.Tensor | None:
    """A caller's bool mask [B or 1, S, cached + S] as the attention's [B or 1, 1, S, cached + S]."""
    if attn_mask is None:
        return None
    if attn_mask.shape[-2:] != (seq_len, cached + seq_len):
        raise ValueError(f"attn_mask has shape {list(attn_mask.shape)}, expected "
                         f"[B or 1, {seq_len}, {cached + seq_len}] (chunk x cached+chunk)")
    return attn_mask[:, None]


class _CacheRows:
    """The buffers and the row bookkeeping both layouts share."""

    def __init__(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, allocate):
        self.keys = allocate(shape, device=device, dtype=dtype)
        self.values = allocate(shape, device=device, dtype=dtype)
        self._layers = tuple(zip(self.keys.unbind(0), self.values.unbind(0), strict=True))  # [B, H, capacity, hd]
        self.capacity = shape[3]
        self.length = 0
        self._chunk_len = 0

    def begin_chunk(self, chunk_len: int) -> None:
        """Check that a chunk of chunk_len rows fits after the committed rows (before a forward)."""
        end = self.length + chunk_len
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.length} of {self.capacity} rows and cannot take a chunk "
                             f"of {chunk_len}; create it with new_kv_cache(batch_size, capacity >= {end})")
        self._chunk_len = chunk_len

    def _keep_first(self, count: int) -> None:
        if not 0 <= count <= self._chunk_len:
            raise ValueError(f"cannot keep the first {count} rows of a chunk of {self._chunk_len}")
        self.length += count


class KVCache(_CacheRows):
    """Attention over the rows in use; ``commit`` keeps the first n chunk rows or chosen ones."""

    graphs: StepGraphs | None = None  # its steps change shape: always eager

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 capacity: int, device: torch.device, dtype: torch.dtype):
        super().__init__((num_layers, batch_size, num_heads, capacity, head_dim), device, dtype, torch.empty)

    def attention_mask(self, attn_mask: torch.Tensor | None, chunk_len: int) -> torch.Tensor | None:
        """The attention's mask over [0, length + S): the caller's, or None (all cached rows, the
        chunk causally)."""
        return checked_mask(attn_mask, chunk_len, self.length)

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk's keys/values [B, H, S, hd] after the committed rows; return all rows to attend."""
        end = self.length + keys.shape[2]
        layer_keys, layer_values = self._layers[layer]
        layer_keys[:, :, self.length:end] = keys
        layer_values[:, :, self.length:end] = values
        return layer_keys[:, :, :end], layer_values[:, :, :end]

    def commit(self, chunk_rows: int | torch.Tensor) -> None:
        """Keep the keys/values of the last chunk's rows: an int n keeps its first n rows (they are
        already in place), a tensor ([n] or [B, n], indices in [0, S)) keeps the chosen rows."""
        if isinstance(chunk_rows, int):
            self._keep_first(chunk_rows)
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


class StaticKVCache(_CacheRows):
    """Attention over all ``capacity`` rows, those not in use masked; writes at ``position``, a
    device tensor, so that no step's shapes or kernel arguments depend on the cache length.

    ``length`` mirrors ``position`` on the host (capacity checks, callers' masks). ``commit``
    keeps the first n chunk rows only (the samplers' case).
    """

    def __init__(self, num_layers: int, batch_size: int, num_heads: int, head_dim: int,
                 capacity: int, device: torch.device, dtype: torch.dtype, graphs: StepGraphs | None):
        # zeros, not empty: rows not in use are masked out, but 0 x NaN would still reach the output
        super().__init__((num_layers, batch_size, num_heads, capacity, head_dim), device, dtype, torch.zeros)
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.graphs = graphs
        self._rows = torch.arange(capacity, device=device)

    def attention_mask(self, attn_mask: torch.Tensor | None, chunk_len: int) -> torch.Tensor:
        """The attention's mask over all rows: [1, 1, S, capacity] from ``position`` (every committed
        row, the chunk causally), or the caller's [B or 1, S, length + S] padded with False."""
        if attn_mask is None:  # the Eso-LM (B) diffusion mask of queries position, position + 1, ...
            in_use = diffusion_allowed(self.position + self._rows[:chunk_len, None], self._rows, 0, "B")
            return in_use[None, None]
        given = checked_mask(attn_mask, chunk_len, self.length)
        mask = torch.zeros(*given.shape[:-1], self.capacity, dtype=torch.bool, device=self.keys.device)
        mask[..., :given.shape[-1]] = given
        return mask

    def extend(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a chunk's keys/values [B, H, S, hd] at rows position + [0, S); return all rows."""
        rows = self.position + self._rows[:keys.shape[2]]
        layer_keys, layer_values = self._layers[layer]
        return layer_keys.index_copy_(2, rows, keys), layer_values.index_copy_(2, rows, values)

    def commit(self, chunk_rows: int) -> None:
        """Keep the first chunk_rows rows of the last chunk (already in place)."""
        if not isinstance(chunk_rows, int):
            raise TypeError("StaticKVCache.commit keeps the first n rows of a chunk (an int); "
                            "use KVCache to keep chosen rows")
        self._keep_first(chunk_rows)
        self.position += chunk_rows
