"""A bf16 export model rotates q and k as training does: angles and rotation in fp32 (esolm_dist.model.rotary),
one rounding to bf16 at the end, whatever the positions (sampling at L = 8192 uses positions up to 8191)."""

import torch

import esolm_dist.inference.model as inference_model
from esolm_dist.inference.export_io import ExportConfig
from esolm_dist.model.rotary import apply_rotary, rotary_tables

CONFIG = {"format": "esolm-export-v1", "vocab_size": 64, "hidden_size": 64, "num_layers": 1, "num_heads": 2,
          "ffn_hidden_size": 128, "rotary_base": 10000.0, "layernorm_eps": 1e-5, "mask_token_id": 1,
          "eos_token_id": 0, "max_seq_len": 8192, "variant": "B", "alpha0": 0.25, "dtype": "bfloat16"}


def test_bf16_inference_rotates_queries_and_keys_in_fp32(monkeypatch):
    torch.manual_seed(0)
    model = inference_model.EsoLM(ExportConfig.from_dict(CONFIG, "test config")).to(torch.bfloat16).eval()
    length, heads, head_dim = 64, 2, 32
    positions = torch.randperm(8192, generator=torch.Generator().manual_seed(1))[:length][None]
    projected, attended = [], []
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: projected.append(out))
    attend = inference_model.attend_after_cache

    def spy(q, k, v, mask, backend):
        attended.append((q, k))
        return attend(q, k, v, mask, backend)

    monkeypatch.setattr(inference_model, "attend_after_cache", spy)
    with torch.no_grad():
        model(torch.randint(2, 64, (1, length)), positions)
    qkv = projected[0].view(1, length, 3, heads, head_dim).permute(2, 0, 3, 1, 4)  # rows: all q, all k, all v
    cos, sin = rotary_tables(positions, head_dim, CONFIG["rotary_base"])
    for rotated, unrotated in zip(attended[0], qkv[:2], strict=True):
        expected = apply_rotary(unrotated, cos, sin)  # training's rotation: fp32, rounded once
        torch.testing.assert_close(rotated.float(), expected.float(), rtol=torch.finfo(torch.bfloat16).eps, atol=0)
