"""Text samples from the network being trained, logged to the MLflow run at each evaluation.

The live weights are consolidated (any TP / PP / ZeRO layout), turned into the export's
reference layout and sampled with the sampler users run on exports of the same model (eso.model).
"""

from __future__ import annotations

import torch

from esolm_dist.config import RunConfig, to_dict
from esolm_dist.eso.sampling import sample
from esolm_dist.inference.export_io import export_config
from esolm_dist.inference.model import EsoLM
from esolm_dist.weight_layout import to_reference_layout


def preview_samples(network_weights: dict[str, torch.Tensor], cfg: RunConfig, tokenizer, mask_id: int,
                    count: int, seed: int, device: torch.device) -> list[str]:
    """``count`` samples of L tokens (the model's sampler, Eso-LM's at the training alpha_0, T = L, top-p 0.9)."""
    weights = to_reference_layout(network_weights, cfg.model.num_heads)
    config = export_config({"config": to_dict(cfg), "mask_id": mask_id}, weights, tokenizer, "float32")
    model = EsoLM(config, tokenizer.vocab_size)
    model.load_state_dict(weights)
    model = model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        result = sample(model, count, cfg.model.seq_len, variant=cfg.eso.variant,
                        alpha0=cfg.eso.alpha0, num_steps=cfg.model.seq_len, top_p=0.9, generator=generator,
                        device=device)
    return [tokenizer.decode(row.tolist()) for row in result.tokens.cpu()]
