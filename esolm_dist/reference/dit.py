"""The reference Eso-LM network (``EsoLMDiT`` of s-sahoo/Eso-LMs ``models/dit.py``): its weight names,
its forward pass, and its exact fold into our block (design.md "The block").

The reference block, as defined there (dropout off):
    c = silu(sigma_map(sigma))                       sigma_map: 256-dim sinusoidal embedding -> MLP(SiLU)
    shift1, scale1, gate1, shift2, scale2, gate2 = adaLN_modulation(c)   (6 chunks of d, in this order)
    x = x + gate1 * attn_out(attention(rotary(attn_qkv(LN(x) * norm1.weight * (1 + scale1) + shift1))))
    x = x + gate2 * mlp(LN(x) * norm2.weight * (1 + scale2) + shift2)
    logits = linear(LN(x) * norm_final.weight * (1 + scale) + shift),  shift, scale = final adaLN(c)
with LN a LayerNorm without affine parameters (eps 1e-5), QKV rows [all q; all k; all v], rotary
over the full head dim (base 10000, non-interleaved halves), no bias on attn_qkv and attn_out.

Eso-LMs never condition on time: sigma = 0, so c and every modulation are constant vectors and fold
exactly into our parameters (ours on the left, computed in float64):
    ln.weight = norm.weight * (1 + scale)      ln.bias = shift
    attn.out.weight = gate[:, None] * attn_out.weight   (attn.out.bias = 0)
    mlp.fc2.weight = gate[:, None] * mlp.2.weight       mlp.fc2.bias = gate * mlp.2.bias
The other direction (``unfold``) writes identity adaLN: zero modulation weights, a bias holding
(shift = our LN bias, scale = 0, gate = 1), so folding it back returns our weights bit for bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ROTARY_BASE = 10000.0
LAYERNORM_EPS = 1e-5
FREQUENCY_SIZE = 256  # TimestepEmbedder's sinusoidal size
COND_DIM = 128  # model.cond_dim of the released configs
ROTARY_BUFFER = "rotary_emb.inv_freq"
BLOCK_PARAMETERS = ("norm1.weight", "attn_qkv.weight", "attn_out.weight", "norm2.weight", "mlp.0.weight",
                    "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "adaLN_modulation.weight", "adaLN_modulation.bias")


def parameter_names(num_layers: int) -> list[str]:
    """The DiT's parameters in the order of ``parameters()`` (module registration order): the order
    of the EMA's ``shadow_params``."""
    names = ["vocab_embed.embedding", "sigma_map.mlp.0.weight", "sigma_map.mlp.0.bias", "sigma_map.mlp.2.weight",
             "sigma_map.mlp.2.bias"]
    names += [f"blocks.{i}.{name}" for i in range(num_layers) for name in BLOCK_PARAMETERS]
    return names + ["output_layer.norm_final.weight", "output_layer.linear.weight", "output_layer.linear.bias",
                    "output_layer.adaLN_modulation.weight", "output_layer.adaLN_modulation.bias"]


def expected_shapes(vocab: int, hidden: int, num_layers: int, ffn: int, cond: int,
                    frequency: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of the DiT's state dict (parameters and the rotary buffer) and its shape."""
    d = hidden
    shapes = {"vocab_embed.embedding": (vocab, d), "sigma_map.mlp.0.weight": (cond, frequency),
              "sigma_map.mlp.0.bias": (cond,), "sigma_map.mlp.2.weight": (cond, cond), "sigma_map.mlp.2.bias": (cond,)}
    block = {"norm1.weight": (d,), "attn_qkv.weight": (3 * d, d), "attn_out.weight": (d, d), "norm2.weight": (d,),
             "mlp.0.weight": (ffn, d), "mlp.0.bias": (ffn,), "mlp.2.weight": (d, ffn), "mlp.2.bias": (d,),
             "adaLN_modulation.weight": (6 * d, cond), "adaLN_modulation.bias": (6 * d,)}
    for i in range(num_layers):
        shapes.update({f"blocks.{i}.{name}": shape for name, shape in block.items()})
    shapes.update({"output_layer.norm_final.weight": (d,), "output_layer.linear.weight": (vocab, d),
                   "output_layer.linear.bias": (vocab,), "output_layer.adaLN_modulation.weight": (2 * d, cond),
                   "output_layer.adaLN_modulation.bias": (2 * d,)})
    return shapes


def rotary_frequencies(head_dim: int) -> torch.Tensor:
    """The reference ``Rotary`` buffer: 1 / base^(2i / head_dim), fp32."""
    return 1.0 / (ROTARY_BASE ** (torch.arange(0, head_dim, 2).float() / head_dim))


def condition(w: dict[str, torch.Tensor], batch: int = 1) -> torch.Tensor:
    """c = silu(sigma_map(sigma = 0)) [batch, cond]: the embedding of t = 0 is cos(0) = 1 on its
    first half and sin(0) = 0 on the second."""
    frequency = w["sigma_map.mlp.0.weight"].shape[1]
    t_emb = torch.zeros(batch, frequency, dtype=w["sigma_map.mlp.0.weight"].dtype)
    t_emb[:, : frequency // 2] = 1.0
    hidden = F.silu(F.linear(t_emb, w["sigma_map.mlp.0.weight"], w["sigma_map.mlp.0.bias"]))
    return F.silu(F.linear(hidden, w["sigma_map.mlp.2.weight"], w["sigma_map.mlp.2.bias"]))


def fold(backbone: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Reference DiT weights -> our export's weights (fp32), adaLN folded at sigma = 0."""
    w = {name: tensor.double() for name, tensor in backbone.items() if name != ROTARY_BUFFER}
    c = condition(w)[0]
    out = {"embed.weight": w["vocab_embed.embedding"]}
    for i in range(num_layers):
        ref, ours = f"blocks.{i}.", f"blocks.{i}."
        modulation = w[ref + "adaLN_modulation.weight"] @ c + w[ref + "adaLN_modulation.bias"]
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6)
        out.update({
            ours + "ln1.weight": w[ref + "norm1.weight"] * (1 + scale1), ours + "ln1.bias": shift1,
            ours + "attn.qkv.weight": w[ref + "attn_qkv.weight"],
            ours + "attn.out.weight": gate1[:, None] * w[ref + "attn_out.weight"],
            ours + "attn.out.bias": torch.zeros_like(gate1),
            ours + "ln2.weight": w[ref + "norm2.weight"] * (1 + scale2), ours + "ln2.bias": shift2,
            ours + "mlp.fc1.weight": w[ref + "mlp.0.weight"], ours + "mlp.fc1.bias": w[ref + "mlp.0.bias"],
            ours + "mlp.fc2.weight": gate2[:, None] * w[ref + "mlp.2.weight"],
            ours + "mlp.fc2.bias": gate2 * w[ref + "mlp.2.bias"],
        })
    final = w["output_layer.adaLN_modulation.weight"] @ c + w["output_layer.adaLN_modulation.bias"]
    shift, scale = final.chunk(2)
    out.update({"final_ln.weight": w["output_layer.norm_final.weight"] * (1 + scale), "final_ln.bias": shift,
                "head.weight": w["output_layer.linear.weight"], "head.bias": w["output_layer.linear.bias"]})
    return {name: tensor.float().contiguous() for name, tensor in out.items()}


def unfold(ours: dict[str, torch.Tensor], num_layers: int, num_heads: int, cond: int = COND_DIM,
           frequency: int = FREQUENCY_SIZE) -> dict[str, torch.Tensor]:
    """Our export's weights (attention-output bias zero) -> reference DiT weights with identity adaLN,
    in state-dict order (parameters, with the rotary buffer after sigma_map as the module registers it)."""
    hidden = ours["embed.weight"].shape[1]
    zeros = torch.zeros
    w = {"vocab_embed.embedding": ours["embed.weight"],
         "sigma_map.mlp.0.weight": zeros(cond, frequency), "sigma_map.mlp.0.bias": zeros(cond),
         "sigma_map.mlp.2.weight": zeros(cond, cond), "sigma_map.mlp.2.bias": zeros(cond),
         ROTARY_BUFFER: rotary_frequencies(hidden // num_heads)}
    no_scale, unit_gate = zeros(hidden), torch.ones(hidden)
    for i in range(num_layers):
        p = f"blocks.{i}."
        w.update({
            p + "norm1.weight": ours[p + "ln1.weight"], p + "attn_qkv.weight": ours[p + "attn.qkv.weight"],
            p + "attn_out.weight": ours[p + "attn.out.weight"], p + "norm2.weight": ours[p + "ln2.weight"],
            p + "mlp.0.weight": ours[p + "mlp.fc1.weight"], p + "mlp.0.bias": ours[p + "mlp.fc1.bias"],
            p + "mlp.2.weight": ours[p + "mlp.fc2.weight"], p + "mlp.2.bias": ours[p + "mlp.fc2.bias"],
            p + "adaLN_modulation.weight": zeros(6 * hidden, cond),
            p + "adaLN_modulation.bias": torch.cat([ours[p + "ln1.bias"], no_scale, unit_gate,
                                                    ours[p + "ln2.bias"], no_scale, unit_gate]),
        })
    w.update({"output_layer.norm_final.weight": ours["final_ln.weight"],
              "output_layer.linear.weight": ours["head.weight"], "output_layer.linear.bias": ours["head.bias"],
              "output_layer.adaLN_modulation.weight": zeros(2 * hidden, cond),
              "output_layer.adaLN_modulation.bias": torch.cat([ours["final_ln.bias"], no_scale])})
    return {name: tensor.float().contiguous() for name, tensor in w.items()}


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _modulated_norm(x, weight, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=LAYERNORM_EPS) * weight * (1 + scale) + shift


def reference_logits(w: dict[str, torch.Tensor], num_heads: int, tokens: torch.Tensor, positions: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
    """The unfolded reference network, sigma = 0: logits [B, S, V] of tokens [B, S] at original positions
    [B, S] under the attention mask ``allowed`` [B, S, S] (True = may attend). No logit is masked."""
    batch, seq = tokens.shape
    x = w["vocab_embed.embedding"][tokens]
    c = condition(w, batch)[:, None]  # [B, 1, cond]
    hidden = x.shape[-1]
    head_dim = hidden // num_heads
    angles = positions[..., None].to(torch.float32) * rotary_frequencies(head_dim)
    angles = torch.cat((angles, angles), dim=-1)[:, :, None]  # [B, S, 1, hd]
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    bias = torch.zeros(allowed.shape, dtype=x.dtype).masked_fill(~allowed, float("-inf"))[:, None]
    num_layers = len({name.split(".")[1] for name in w if name.startswith("blocks.")})
    for i in range(num_layers):
        p = f"blocks.{i}."
        modulation = F.linear(c, w[p + "adaLN_modulation.weight"], w[p + "adaLN_modulation.bias"])
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.chunk(6, dim=-1)
        h = _modulated_norm(x, w[p + "norm1.weight"], shift1, scale1)
        q, k, v = (h @ w[p + "attn_qkv.weight"].T).view(batch, seq, 3, num_heads, head_dim).unbind(2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + bias
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v).reshape(batch, seq, hidden)
        x = x + gate1 * (attended @ w[p + "attn_out.weight"].T)
        h = _modulated_norm(x, w[p + "norm2.weight"], shift2, scale2)
        h = F.gelu(F.linear(h, w[p + "mlp.0.weight"], w[p + "mlp.0.bias"]), approximate="tanh")
        x = x + gate2 * F.linear(h, w[p + "mlp.2.weight"], w[p + "mlp.2.bias"])
    modulation = F.linear(c, w["output_layer.adaLN_modulation.weight"], w["output_layer.adaLN_modulation.bias"])
    shift, scale = modulation.chunk(2, dim=-1)
    x = _modulated_norm(x, w["output_layer.norm_final.weight"], shift, scale)
    return F.linear(x, w["output_layer.linear.weight"], w["output_layer.linear.bias"])
