"""The DeepSpeed engine: ZeRO over the data-parallel group, clipping, accumulation, bf16.

We build the optimizer (AdamW: NVIDIA apex's FusedAdam on GPU when installed, else torch's)
and the LR schedule ourselves and hand them to DeepSpeed together with ``mpu``, so ZeRO shards
over the DP group only and gradient clipping counts tensor-parallel shards correctly. The DeepSpeed JSON is generated from
our config; nothing else configures DeepSpeed.
"""

from __future__ import annotations

import logging
import os
import warnings

import torch
from megatron.core import parallel_state as ps

from esolm_dist.config import RunConfig
from esolm_dist.kernels import fused
from esolm_dist.model.objective import EsoObjective
from esolm_dist.parallel.engine_adapter import PipelineEngine, PlainEngine, TrainingEngine
from esolm_dist.parallel.pipeline import pipeline_module
from esolm_dist.parallel.state import Topology, announce_jit_build


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


def mark_norm_owners(module: torch.nn.Module) -> None:
    """Make every gradient count exactly once in the global norm used for clipping.

    DeepSpeed counts a parameter if ``model_parallel`` is set on it, else only on rank 0 of its
    model-parallel group, which spans TP x PP: replicated parameters (LayerNorms, row-parallel
    biases) of every stage but the first would be left out. So: TP shards count on every rank,
    replicated parameters on TP rank 0 of each stage.
    """
    first_tp_rank = ps.get_tensor_model_parallel_rank() == 0
    for param in module.parameters():
        param.model_parallel = bool(getattr(param, "tensor_model_parallel", False)) or first_tp_rank


def global_grad_norm(module: torch.nn.Module) -> torch.Tensor:
    """L2 norm of the (DP-reduced) gradients over the whole model: all TP shards, all stages."""
    squares = [p.grad.detach().float().square().sum() for p in module.parameters()
               if p.grad is not None and p.model_parallel]
    total = torch.stack(squares).sum() if squares else torch.zeros((), device=next(module.parameters()).device)
    if torch.distributed.get_world_size(ps.get_model_parallel_group()) > 1:
        torch.distributed.all_reduce(total, group=ps.get_model_parallel_group())
    return total.sqrt()


class ClipBeforeStep:
    """ZeRO-0: clip by the global norm right before the optimizer step and remember the norm.

    DeepSpeed's ZeRO-0 path neither reports the norm nor clips pipeline-parallel models over
    all stages; at this point the gradients are already averaged over the DP group. The norm
    stays on the device (reading it is a host sync, left to the log steps).
    """

    def __init__(self, module: torch.nn.Module, max_norm: float):
        self.module = module
        self.max_norm = max_norm
        self.norm: torch.Tensor | None = None

    def __call__(self, optimizer, args, kwargs) -> None:
        self.norm = global_grad_norm(self.module)
        if self.max_norm > 0:
            scale = torch.clamp(self.max_norm / (self.norm + 1e-6), max=1.0)
            for param in self.module.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)

    def last_norm(self) -> float:
        return float(self.norm) if self.norm is not None else float("nan")


# bf16 training keeps fp32 master weights and accumulates and reduces gradients in fp32 (DeepSpeed 0.19.8
# defaults to accumulating in the model's bf16: a gradient below 2^-8 of the running sum is lost). What each
# ZeRO stage then does (tests/test_bf16.py checks every one against a sum computed by hand):
# - ZeRO-1 (no offload, also under pipeline parallelism): DeepSpeed's BF16_Optimizer, fp32 master partitions
#   and one fp32 gradient buffer per parameter, accumulated per micro-batch, all-reduced over DP in fp32;
# - ZeRO-2: stage_1_and_2 with fp32 partitioned accumulation buffers, reduced in fp32 (ZeRO-1 + cpu_offload
#   takes the same optimizer; not measured: CPU Adam is not built in the tests);
# - ZeRO-3: fp32 partitioned gradients, reduce-scattered in fp32;
# - ZeRO-0 is refused by the config (DeepSpeed's bf16 ZeRO-0 keeps no fp32 master at all).
BF16_NUMERICS = {"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}


def deepspeed_config(cfg: RunConfig, dp_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON for this run (batch sizes are per DP replica and global)."""
    t, p = cfg.train, cfg.parallel
    accumulation = t.global_batch_size // (t.micro_batch_size * dp_size)
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:  # pinned host memory speeds up copies to a GPU; training on the CPU has none
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        # 0.19.8 defaults to 1.0 when unset: always set it (0.0 = off). ZeRO-0 clips in ClipBeforeStep.
        "gradient_clipping": cfg.optim.grad_clip if p.zero_stage > 0 else 0.0,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": p.precision == "bf16"},
        **(BF16_NUMERICS if p.precision == "bf16" else {}),
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


def build_engine(objective: EsoObjective, cfg: RunConfig, topo: Topology) -> TrainingEngine:
    """The objective with this run's parallelism applied from outside, as a training engine.

    Pipeline parallelism cuts the objective into this rank's stage (esolm_dist.parallel.pipeline);
    otherwise the objective itself is DeepSpeed's module (recomputing each block's activations in
    backward under parallel.activation_checkpointing). deepspeed.initialize gets our optimizer,
    schedule and process groups: a PipelineModule brings its own grid (same rank order as
    megatron-core), other modules get ``mpu``.
    """
    import deepspeed

    quiet_deepspeed()
    check_batch_layout(cfg, topo.dp_size)
    pipelined = topo.pp_size > 1
    if pipelined:
        module = pipeline_module(objective, topo.tp_size, topo.pp_size, topo.dp_size,
                                 cfg.parallel.activation_checkpointing)
    else:
        objective.network.checkpoint_activations = cfg.parallel.activation_checkpointing
        module = objective
    module = module.to(topo.device)
    mark_norm_owners(module)
    o = cfg.optim
    device = topo.device
    if cfg.parallel.cpu_offload:
        # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            announce_jit_build(os.environ["TORCH_EXTENSIONS_DIR"], "cpu_adam", "CPU Adam (for ZeRO-Offload)")
        optimizer = DeepSpeedCPUAdam(module.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                     weight_decay=o.weight_decay, adamw_mode=True)
    else:
        optimizer = fused.adamw(module.parameters(), device, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.adam_eps,
                                weight_decay=o.weight_decay)
    if torch.distributed.get_rank() == 0:
        print(f"esolm-train: kernels: {fused.describe(device, optimizer)}", flush=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    clip = None
    if cfg.parallel.zero_stage == 0:
        clip = ClipBeforeStep(module, o.grad_clip)
        optimizer.register_step_pre_hook(clip)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, topo.dp_size, device),
                                           mpu=None if pipelined else MegatronMPU(), dist_init_required=False)
    grad_norm = clip.last_norm if clip else (lambda: float(engine.get_global_grad_norm()))
    return (PipelineEngine if pipelined else PlainEngine)(engine, grad_norm)
