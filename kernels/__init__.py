"""Kernels, each beside the plain-torch reference it is checked against (installed as esolm_dist.kernels).

attention   one dispatch for every Eso-LM mask: FlexAttention, flash-attn; reference: dense-mask SDPA
flex_masks  FlexAttention block masks from key ranges; reference: torch's create_block_mask
fused       NVIDIA apex's fused LayerNorm and Adam; reference: torch's LayerNorm and AdamW
"""
