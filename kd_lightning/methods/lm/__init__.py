"""LM distillation schemes, one LightningModule each, built from ``conf/llm/method/*.yaml``."""

from kd_lightning.methods.lm.base import LMMethod
from kd_lightning.methods.lm.distillm2 import DistiLLM2
from kd_lightning.methods.lm.multi_teacher import MultiTeacher
from kd_lightning.methods.lm.on_policy import OnPolicy, sampled_batch
from kd_lightning.methods.lm.sft import SFT
from kd_lightning.methods.lm.token_kd import TokenKD

__all__ = ["SFT", "DistiLLM2", "LMMethod", "MultiTeacher", "OnPolicy", "TokenKD", "sampled_batch"]
