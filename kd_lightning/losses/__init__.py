"""Distillation losses: one registry, mirrored one-to-one by ``conf/loss/*.yaml``."""

from kd_lightning.losses.base import (
    UNLABELLED,
    DistillationLoss,
    DistillationTerm,
    LayerTerm,
    LossOutput,
    MultiLayerTerm,
    masked_cross_entropy,
)
from kd_lightning.losses.contrastive import CRD
from kd_lightning.losses.features import VID, AttentionTransfer, FitNets, ReviewKD
from kd_lightning.losses.logit_variants import CTKD, NKD, WTTM
from kd_lightning.losses.logits import DIST, DKD, KLDivergence, soft_kl, standardize
from kd_lightning.losses.relations import CC, PKT, RKD, SP

#: Every distillation term by the name used in ``conf/loss/<name>.yaml``.
TERMS: dict[str, type[DistillationTerm]] = {
    "kd": KLDivergence,
    "dkd": DKD,
    "dist": DIST,
    "nkd": NKD,
    "wttm": WTTM,
    "ctkd": CTKD,
    "fitnet": FitNets,
    "at": AttentionTransfer,
    "vid": VID,
    "rkd": RKD,
    "sp": SP,
    "pkt": PKT,
    "cc": CC,
    "crd": CRD,
    "reviewkd": ReviewKD,
}

__all__ = [
    "CC",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "NKD",
    "PKT",
    "RKD",
    "SP",
    "TERMS",
    "UNLABELLED",
    "VID",
    "WTTM",
    "AttentionTransfer",
    "DistillationLoss",
    "DistillationTerm",
    "FitNets",
    "KLDivergence",
    "LayerTerm",
    "LossOutput",
    "MultiLayerTerm",
    "ReviewKD",
    "masked_cross_entropy",
    "soft_kl",
    "standardize",
]
