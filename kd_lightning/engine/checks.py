"""Checks that need no training: run before any teacher is trained or any step is taken."""

from __future__ import annotations

import torch
from torch import nn

from kd_lightning.engine.errors import ConfigError


def check_class_counts(example: torch.Tensor, num_classes: int, **models: nn.Module) -> None:
    """Run one example batch through each model (keyword: its config key) and compare its logits to
    ``data.num_classes``."""
    for key, model in models.items():
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(example)
        model.train(was_training)
        if out.shape[-1] != num_classes:
            raise ConfigError(
                f"{key}.model outputs {out.shape[-1]} classes but data.num_classes={num_classes}; "
                f"set {key}.model.num_classes={num_classes} (or pick matching data)"
            )
