"""Distillation losses: one registry, mirrored one-to-one by ``conf/loss/*.yaml``."""

from kd_lightning.losses.base import UNLABELLED, DistillationLoss, LossOutput, masked_cross_entropy
from kd_lightning.losses.classifier_features import CATKD, SRD
from kd_lightning.losses.contrastive import CRD
from kd_lightning.losses.factor_transfer import FactorTransfer
from kd_lightning.losses.feature_correlation import ICKD, NST
from kd_lightning.losses.feature_statistics import WKDF
from kd_lightning.losses.features import VID, AttentionTransfer, FitNets, ReviewKD
from kd_lightning.losses.logit_multilevel import MLKD, SDD
from kd_lightning.losses.logit_variants import CTKD, NKD, WTTM
from kd_lightning.losses.logit_wasserstein import WKDL
from kd_lightning.losses.logits import DIST, DKD, KLDivergence, soft_kl, standardize
from kd_lightning.losses.overhaul import OFD
from kd_lightning.losses.relations import CC, PKT, RKD, SP
from kd_lightning.losses.terms import DistillationTerm, LayerTerm, MultiLayerTerm

#: Every distillation term by the name used in ``conf/loss/<name>.yaml``.
TERMS: dict[str, type[DistillationTerm]] = {
    "kd": KLDivergence,
    "dkd": DKD,
    "dist": DIST,
    "nkd": NKD,
    "wttm": WTTM,
    "ctkd": CTKD,
    "mlkd": MLKD,
    "sdd": SDD,
    "wkd_l": WKDL,
    "fitnet": FitNets,
    "at": AttentionTransfer,
    "vid": VID,
    "rkd": RKD,
    "sp": SP,
    "pkt": PKT,
    "cc": CC,
    "crd": CRD,
    "reviewkd": ReviewKD,
    "ickd": ICKD,
    "nst": NST,
    "srd": SRD,
    "ofd": OFD,
    "ft": FactorTransfer,
    "catkd": CATKD,
    "wkd_f": WKDF,
}

__all__ = [
    "CATKD",
    "CC",
    "CRD",
    "CTKD",
    "DIST",
    "DKD",
    "ICKD",
    "MLKD",
    "NKD",
    "NST",
    "OFD",
    "PKT",
    "RKD",
    "SDD",
    "SP",
    "SRD",
    "TERMS",
    "UNLABELLED",
    "VID",
    "WKDF",
    "WKDL",
    "WTTM",
    "AttentionTransfer",
    "DistillationLoss",
    "DistillationTerm",
    "FactorTransfer",
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
