"""The DeepSpeed engine: ZeRO over the data-parallel group, clipping, accumulation, bf16.

We build the optimizer (torch AdamW) and the LR schedule ourselves and hand them to
DeepSpeed together with ``mpu``, so ZeRO shards over the DP group only and gradient
clipping counts tensor-parallel shards correctly. The DeepSpeed JSON is generated from
our config; nothing else configures DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from megatron.core import parallel_state as ps

from esolm_dist.config import RunConfig


class MegatronMPU:
    """DeepSpeed's ``mpu`` interface over megatron-core's process groups.

    DeepSpeed's "model parallel" rank is the TP rank (it counts replicated parameters once
    per TP group); its model-parallel group spans TP x PP so the gradient norm covers all
    stages.
    """

    get_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_model_parallel_group = staticmethod(ps.get_model_parallel_group)
    get_tensor_model_parallel_rank = staticmethod(ps.get_tensor_model_parallel_rank)
    get_tensor_model_parallel_world_size = staticmethod(ps.get_tensor_model_parallel_world_size)
    get_tensor_model_parallel_group = staticmethod(ps.get_tensor_model_parallel_group)
    get_tensor_model_parallel_src_rank = staticmethod(ps.get_tensor_model_parallel_src_rank)
    get_pipe_parallel_rank = staticmethod(ps.get_pipeline_model_parallel_rank)
    get_pipe_parallel_world_size = staticmethod(ps.get_pipeline_model_parallel_world_size)
    get_pipe_parallel_group = staticmethod(ps.get_pipeline_model_parallel_group)
    get_data_parallel_rank = staticmethod(ps.get_data_parallel_rank)
    get_data_parallel_world_size = staticmethod(ps.get_data_parallel_world_size)
    get_data_parallel_group = staticmethod(ps.get_data_parallel_group)

    @staticmethod
    def get_data_parallel_group_ranks():
        return torch.distributed.get_process_group_ranks(ps.get_data_parallel_group())


def mark_tensor_parallel_params(module: torch.nn.Module) -> None:
    """DeepSpeed's clipping counts a parameter on every TP rank only if ``model_parallel`` is set;
    megatron-core marks its shards ``tensor_model_parallel``. Replicated ones count once."""
    for param in module.parameters():
        if getattr(param, "tensor_model_parallel", False):
            param.model_parallel = True


def tensor_parallel_grad_norm(module: torch.nn.Module) -> float:
    """Global L2 norm of the (DP-reduced) gradients: TP shards summed over the model-parallel group,
    replicated parameters counted once. For ZeRO-0, where DeepSpeed does not report the norm."""
    first_tp_rank = ps.get_tensor_model_parallel_rank() == 0
    squares = [p.grad.detach().float().square().sum() for p in module.parameters()
               if p.grad is not None and (first_tp_rank or getattr(p, "model_parallel", False))]
    total = torch.stack(squares).sum() if squares else torch.zeros(())
    if torch.distributed.get_world_size(ps.get_model_parallel_group()) > 1:
        torch.distributed.all_reduce(total, group=ps.get_model_parallel_group())
    return float(total.sqrt())


def deepspeed_config(cfg: RunConfig, dp_size: int) -> dict:
    """The DeepSpeed JSON for this run (batch sizes are per DP replica and global)."""
    t, p = cfg.train, cfg.parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # 0.19.8 defaults to 1.0 when unset: always set it (0.0 = off).
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": p.precision == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def check_batch_layout(cfg: RunConfig, dp_size: int) -> None:
    from esolm_dist.config import ConfigError

    t = cfg.train
    if t.global_batch_size % (t.micro_batch_size * dp_size) != 0:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must equal train.micro_batch_size "
            f"({t.micro_batch_size}) x gradient accumulation x data-parallel size ({dp_size}); choose a global "
            f"batch that is a multiple of {t.micro_batch_size * dp_size}")


def lr_lambda(cfg: RunConfig):
    """Linear warmup, then constant (the paper) or a linear decay to lr * min_lr_ratio."""
    o, steps = cfg.optim, cfg.train.max_steps

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.min_lr_ratio >= 1.0:
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, steps - o.warmup_steps))
        return 1.0 - (1.0 - o.min_lr_ratio) * progress

    return factor


def quiet_deepspeed() -> None:
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*")
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_engine(module: torch.nn.Module, cfg: RunConfig, dp_size: int):
    """deepspeed.initialize with our optimizer, schedule and mpu; returns the engine."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions"))
    import deepspeed

    quiet_deepspeed()
    check_batch_layout(cfg, dp_size)
    mark_tensor_parallel_params(module)
    o = cfg.optim
    optimizer = torch.optim.AdamW(module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, dp_size), mpu=MegatronMPU(),
                                           dist_init_required=False)
    return engine
