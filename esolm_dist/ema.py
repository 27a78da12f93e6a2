"""Exponential moving average of the fp32 master weights (the paper keeps EMA 0.9999), partitioned
across the data-parallel group like ZeRO's optimizer state.

Each rank keeps the EMA of one contiguous slice of every (TP-local) parameter, flattened: the slice
of the fp32 master that this rank's optimizer owns.

- ZeRO-1/2 and DeepSpeed's BF16_Optimizer (bf16 + ZeRO-1): the fragment of the optimizer's flat fp32
  partition that belongs to the parameter (``param._hp_mapping``; empty when the partition holds none);
- ZeRO-3: the parameter's fp32 partition (``deepspeed.utils.safe_get_local_fp32_param``), without
  the padding of the last rank;
- no ZeRO (fp32 only: the config refuses bf16 + ZeRO-0): the module's parameters are the master,
  replicated; DP rank r takes the r-th of DP equal slices.

So the EMA's bytes per rank, and in a checkpoint's ``rank_*.pt`` files in total, do not grow with DP,
and a bf16 run averages its fp32 master, never the bf16 copy the forward pass uses.
esolm_dist.parallel.consolidate (live) and esolm_dist.checkpoint_reader (offline) reassemble the
slices from their recorded ``(start, shape)``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from esolm_dist.weight_layout import local_shape


def master_slice(param: nn.Parameter) -> tuple[int, torch.Tensor]:
    """(start in the flattened parameter, this rank's slice of its fp32 master: flat, on its device)."""
    if hasattr(param, "ds_id"):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(param)
        partition = param.ds_tensor.numel()
        start = min(dist.get_rank(group=param.ds_process_group) * partition, local_shape(param).numel())
        return start, local.view(-1)[: max(0, min(partition, local_shape(param).numel() - start))]
    if hasattr(param, "_hp_mapping"):  # ZeRO-1/2, BF16_Optimizer
        mapping = param._hp_mapping
        if mapping is None:
            return 0, torch.empty(0, dtype=torch.float32, device=param.device)
        return mapping.lp_fragment_address.start, mapping.hp_fragment.view(-1)
    if param.dtype != torch.float32:
        raise RuntimeError("the EMA needs fp32 master weights: a bf16 run needs parallel.zero_stage >= 1")
    numel, dp_rank, dp_size = param.numel(), ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    per_rank = -(-numel // dp_size)
    start = min(dp_rank * per_rank, numel)
    return start, param.detach().view(-1)[start: min(start + per_rank, numel)]


class EMA:
    """fp32 shadows of this rank's slices of the master weights, updated after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {}
        self.slices: dict[str, tuple[int, list[int]]] = {}  # name -> (start, TP-local shape)
        for name, param in module.named_parameters():
            start, master = master_slice(param)
            self.shadow[name] = master.detach().float().clone()
            self.slices[name] = (start, list(local_shape(param)))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            self.shadow[name].lerp_(master_slice(param)[1].float(), 1.0 - self.decay)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow.values())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow, "slices": self.slices}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}: the checkpoint is from another model")
        self.decay = state["decay"]
        if "slices" not in state:  # written before the EMA was partitioned: whole (or ZeRO-3-partition) shadows
            state = {"shadow": {name: self._own_slice_of_unpartitioned(name, tensor)
                                for name, tensor in state["shadow"].items()}, "slices": self.slices}
        for name, (start, shape) in self.slices.items():
            saved_start, saved_shape = state["slices"][name]
            if (saved_start, list(saved_shape)) != (start, shape) or state["shadow"][name].numel() != \
                    self.shadow[name].numel():
                raise ValueError(f"the checkpoint's EMA slice of {name} is another layout's: resume with the "
                                 "layout that wrote it")
        self.shadow = {name: state["shadow"][name].float().to(self.shadow[name].device) for name in self.shadow}

    def _own_slice_of_unpartitioned(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's slice from a shadow of the earlier format: the TP-local tensor, or under ZeRO-3
        this DP rank's padded partition."""
        start, shape = self.slices[name]
        numel = self.shadow[name].numel()
        flat = tensor.reshape(-1)
        if list(tensor.shape) == shape:
            return flat[start: start + numel].clone()
        return flat[:numel].clone()  # ZeRO-3 partition
