"""Model inputs of either kind a datamodule may serve: a tensor (images, signals) or a mapping of tensors
(tokenised text: ``input_ids``, ``attention_mask``, ...; Hugging Face's convention), first dimension the batch.

Code that handles a batch's ``x`` without knowing which (its size, its device, moving it, repeating its
rows) goes through these functions instead of tensor methods.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor

Inputs = Tensor | Mapping[str, Tensor]


def first_tensor(x: Inputs) -> Tensor:
    """``x`` itself, or the first tensor of a mapping (what its batch size and device are read from)."""
    if isinstance(x, Tensor):
        return x
    for value in x.values():
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"model inputs must be a tensor or a mapping of tensors, got {type(x).__name__}")


def batch_size(x: Inputs) -> int:
    """The number of samples in ``x``."""
    return first_tensor(x).shape[0]


def input_device(x: Inputs) -> torch.device:
    """The device ``x`` lives on."""
    return first_tensor(x).device


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    """``x`` (every tensor of a mapping) on ``device``."""
    return move_data_to_device(x, device)


def repeat_rows(x: Inputs, rows: int) -> Inputs:
    """``x`` with its samples repeated (cyclically) to exactly ``rows`` samples."""
    if isinstance(x, Tensor):
        repeats = -(-rows // x.shape[0])
        return x.repeat(repeats, *(1,) * (x.dim() - 1))[:rows]
    return {key: repeat_rows(value, rows) if isinstance(value, Tensor) else value for key, value in x.items()}
