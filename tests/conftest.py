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


TINY_TRAINING = ["model.num_layers=2", "model.hidden_size=32", "model.num_heads=2", "model.seq_len=32",
                 "train.micro_batch_size=4", "train.global_batch_size=8", "train.log_every=1", "train.eval_every=4",
                 "train.eval_batches=2", "train.save_every=4", "optim.warmup_steps=2", "optim.lr=3e-3"]


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """Shards of the bundled corpus at L = 32, built once per session by the first trainer."""
    return tmp_path_factory.mktemp("shards")


def tiny_config(run_dir, shard_dir, *extra):
    """A seconds-long training run on the bundled corpus (the trainer builds the shards when missing)."""
    from esolm_dist.config import load_config

    return load_config(None, [f"train.run_dir={run_dir}", f"data.shard_dir={shard_dir}",
                              f"logging.mlflow_uri=sqlite:///{run_dir}/mlflow.db", *TINY_TRAINING, *extra])
