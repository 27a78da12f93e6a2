"""Exponential moving average of the weights (the paper keeps EMA 0.9999)."""

from __future__ import annotations

import torch
from torch import nn


def local_data(param: nn.Parameter) -> torch.Tensor:
    """The part of a parameter this rank owns: the ZeRO-3 partition when partitioned, else the tensor."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """fp32 shadow copies of this rank's parameters, updated after every optimizer step."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {name: local_data(p).detach().float().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        for name, param in module.named_parameters():
            self.shadow[name].lerp_(local_data(param).float(), 1.0 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:3]}: the checkpoint is from another model")
        self.decay = state["decay"]
        self.shadow = {name: tensor.float() for name, tensor in state["shadow"].items()}
