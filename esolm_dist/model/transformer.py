"""The Eso-LM network: a pre-LayerNorm transformer from megatron-core tensor-parallel layers.

Layout (design.md "The block"): untied token embedding (vocab-parallel); per block
LN -> QKV (column-parallel, no bias) -> rotary at original positions -> attention with the
Eso-LM mask -> out projection (row-parallel) -> residual; LN -> fc1 (column-parallel) ->
GELU(tanh) -> fc2 (row-parallel) -> residual; final LN -> output (column-parallel, vocab
shard per TP rank). No time conditioning.

The fused QKV weight is ordered per head, [H, (q, k, v), head_dim] rows, so any TP degree
takes whole heads; tools/convert.py maps it to the reference [all q; all k; all v].
The model is a list of components (embedding, blocks, head) so that pipeline parallelism
(esolm_dist.parallel.pipeline) can cut it into stages from outside without the model knowing.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from torch import nn
from torch.utils.checkpoint import checkpoint

from esolm_dist.config import ModelConfig
from esolm_dist.eso.masks import RowMaskSpec
from esolm_dist.kernels.attention import AttentionPlan, plan_attention
from esolm_dist.kernels.fused import LayerNorm
from esolm_dist.model.rotary import apply_rotary, rotary_tables


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    return int(math.ceil(tokenizer_vocab / multiple) * multiple)


def megatron_config(tp_size: int, dtype: torch.dtype) -> ModelParallelConfig:
    """Build every weight on the CPU from one full master tensor: identical init for any TP degree."""
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
    )


@contextlib.contextmanager
def seeded_init(seed: int, index: int):
    """Initialise one component (embedding = 0, block i = i + 1, head = L + 1) from its own seed,
    so its weights are the same whichever pipeline stage builds it and whatever was built before."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 100_003 + index)
        yield


def _normal_init(std: float):
    return lambda weight: nn.init.normal_(weight, mean=0.0, std=std)


class Embedding(nn.Module):
    """Token embedding [V, d], split over the vocabulary across TP ranks."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, mp_config: ModelParallelConfig):
        super().__init__()
        self.word = VocabParallelEmbedding(vocab_size, cfg.hidden_size, init_method=_normal_init(cfg.init_std),
                                           config=mp_config)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.word(tokens))


class Block(nn.Module):
    """One pre-LN transformer block; attention heads and FFN columns are split across TP ranks."""

    def __init__(self, cfg: ModelConfig, mp_config: ModelParallelConfig):
        super().__init__()
        tp = mp_config.tensor_model_parallel_size
        self.local_heads = cfg.num_heads // tp
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.rotary_base = cfg.rotary_base
        init = _normal_init(cfg.init_std)
        self.ln1 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, config=mp_config, init_method=init,
                                        bias=False, gather_output=False)
        self.out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, config=mp_config, init_method=init,
                                     bias=True, input_is_parallel=True, skip_bias_add=False)
        self.ln2 = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_size, config=mp_config, init_method=init,
                                        bias=True, gather_output=False)
        self.fc2 = RowParallelLinear(cfg.ffn_size, cfg.hidden_size, config=mp_config, init_method=init,
                                     bias=True, input_is_parallel=True, skip_bias_add=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def attention(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  attend: AttentionPlan) -> torch.Tensor:
        rows, seq, _ = hidden.shape
        qkv, _ = self.qkv(hidden)
        qkv = qkv.view(rows, seq, self.local_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        q, k = apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin)
        context = attend(q, k, qkv[2])  # [R, H_local, S, D]
        out, _ = self.out(context.transpose(1, 2).reshape(rows, seq, self.local_heads * self.head_dim))
        return out

    def forward(self, hidden, cos, sin, attend: AttentionPlan) -> torch.Tensor:
        hidden = hidden + self.dropout(self.attention(self.ln1(hidden), cos, sin, attend))
        mlp, _ = self.fc1(self.ln2(hidden))
        mlp, _ = self.fc2(F.gelu(mlp, approximate="tanh"))
        return hidden + self.dropout(mlp)


class Head(nn.Module):
    """Final LN and the output layer; returns this TP rank's vocabulary shard of the logits.

    The mask token and the padding ids are never predicted: their logits are -inf.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, never_predict: list[int],
                 mp_config: ModelParallelConfig):
        super().__init__()
        self.final_ln = LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.output = ColumnParallelLinear(cfg.hidden_size, vocab_size, config=mp_config,
                                           init_method=_normal_init(cfg.init_std), bias=True, gather_output=False)
        shard = vocab_size // mp_config.tensor_model_parallel_size
        first_id = ps.get_tensor_model_parallel_rank() * shard
        blocked = torch.zeros(shard, dtype=torch.bool)
        for token_id in never_predict:
            if first_id <= token_id < first_id + shard:
                blocked[token_id - first_id] = True
        self.register_buffer("blocked", blocked, persistent=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits, _ = self.output(self.final_ln(hidden))
        return logits.masked_fill(self.blocked, float("-inf"))


class NetworkParts:
    """What every component needs to know: padded vocabulary, ids never predicted, megatron config."""

    def __init__(self, cfg: ModelConfig, tokenizer_vocab: int, mask_id: int, dtype: torch.dtype):
        tp = ps.get_tensor_model_parallel_world_size()
        self.vocab_size = padded_vocab_size(tokenizer_vocab, cfg.vocab_pad_multiple * tp)
        self.never_predict = [mask_id, *range(tokenizer_vocab, self.vocab_size)]
        self.mp_config = megatron_config(tp, dtype)


class EsoTransformer(nn.Module):
    """Embedding -> blocks -> head. ``forward`` returns vocab-parallel logits [R, S, V / TP]."""

    def __init__(self, cfg: ModelConfig, tokenizer_vocab: int, mask_id: int, dtype: torch.dtype = torch.float32,
                 init_seed: int = 0):
        super().__init__()
        self.cfg = cfg
        self.mask_id = mask_id
        parts = NetworkParts(cfg, tokenizer_vocab, mask_id, dtype)
        self.vocab_size = parts.vocab_size
        with seeded_init(init_seed, 0):
            self.embedding = Embedding(cfg, self.vocab_size, parts.mp_config)
        blocks = []
        for index in range(cfg.num_layers):
            with seeded_init(init_seed, index + 1):
                blocks.append(Block(cfg, parts.mp_config))
        self.blocks = nn.ModuleList(blocks)
        with seeded_init(init_seed, cfg.num_layers + 1):
            self.head = Head(cfg, self.vocab_size, parts.never_predict, parts.mp_config)
        self.last_backend = ""
        self.checkpoint_activations = False  # recompute each block in backward (parallel.activation_checkpointing)

    def context(self, positions: torch.Tensor, masks: RowMaskSpec,
                hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, AttentionPlan]:
        """What every block of one forward pass shares: the rotary tables of ``positions`` and the
        attention plan of ``masks`` (also used by the pipeline stages, esolm_dist.parallel.pipeline)."""
        cos, sin = rotary_tables(positions, self.cfg.hidden_size // self.cfg.num_heads, self.cfg.rotary_base)
        plan = plan_attention(masks, hidden.device, hidden.dtype, self.cfg.attention_backend,
                              needs_grad=torch.is_grad_enabled())
        self.last_backend = plan.backend
        return cos, sin, plan

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, masks: RowMaskSpec) -> torch.Tensor:
        hidden = self.embedding(tokens)
        cos, sin, attend = self.context(positions, masks, hidden)
        for block in self.blocks:
            if self.checkpoint_activations and torch.is_grad_enabled():
                hidden = checkpoint(block, hidden, cos, sin, attend, use_reentrant=False)
            else:
                hidden = block(hidden, cos, sin, attend)
        return self.head(hidden)
