"""Shared fixtures: one single-process gloo group with megatron-core's parallel state (TP=1, PP=1)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(scope="session")
def single_process():
    from esolm_dist.config import ParallelConfig
    from esolm_dist.parallel.state import init_parallel

    return init_parallel(ParallelConfig())


@pytest.fixture(scope="session")
def tiny_model_config():
    from esolm_dist.config import ModelConfig

    return ModelConfig(num_layers=2, hidden_size=32, num_heads=4, seq_len=8, vocab_pad_multiple=8)


TINY_VOCAB = 37
MASK_ID = 36


@pytest.fixture()
def tiny_network(single_process, tiny_model_config):
    from esolm_dist.model.transformer import EsoTransformer

    torch.manual_seed(0)
    return EsoTransformer(tiny_model_config, TINY_VOCAB, MASK_ID).eval()


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Clean token ids that never include the mask id."""
    return torch.randint(0, MASK_ID, (batch, length), generator=torch.Generator().manual_seed(seed))
