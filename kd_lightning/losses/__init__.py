"""Distillation losses: one registry, mirrored one-to-one by ``conf/loss/*.yaml``."""

from kd_lightning.losses.base import (
    UNLABELLED,
    DistillationLoss,
    DistillationTerm,
    LossOutput,
    masked_cross_entropy,
)
from kd_lightning.losses.logits import KLDivergence, soft_kl

#: Every distillation term by the name used in ``conf/loss/<name>.yaml``.
TERMS: dict[str, type[DistillationTerm]] = {
    "kd": KLDivergence,
}

__all__ = [
    "TERMS",
    "UNLABELLED",
    "DistillationLoss",
    "DistillationTerm",
    "KLDivergence",
    "LossOutput",
    "masked_cross_entropy",
    "soft_kl",
]
