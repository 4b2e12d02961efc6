"""Numerics shared by losses: softmaxes and logs in at least float32 under mixed precision."""

from __future__ import annotations

import torch
from torch import Tensor


def at_least_fp32(tensor: Tensor) -> Tensor:
    """Upcast half / bfloat16 tensors to float32; float32 and float64 pass through."""
    return tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.float()


def autocast_off(tensor: Tensor) -> torch.autocast:
    """A context that disables autocast on ``tensor``'s device, so matmuls of upcast inputs stay fp32."""
    return torch.autocast(tensor.device.type, enabled=False)
