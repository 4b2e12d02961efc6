"""Training methods: one LightningModule per scheme, built from ``conf/method/*.yaml``."""

from kd_lightning.methods.base import HasFrozenModels, Method
from kd_lightning.methods.classifier import ClassifierMethod
from kd_lightning.methods.data_free import DataFreeDistillation
from kd_lightning.methods.deit import DeiTDistillationModule
from kd_lightning.methods.foundation import FeatureDistillation, FoundationDistillThenProbe, Probe
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.methods.multi_teacher import MultiTeacherDistillation
from kd_lightning.methods.mutual import MutualLearning
from kd_lightning.methods.stages import AssistantChain, BornAgain, FitNetsTwoStage, MultiStageMethod, Stage
from kd_lightning.methods.supervised import Supervised

__all__ = [
    "AssistantChain",
    "BornAgain",
    "ClassifierMethod",
    "DataFreeDistillation",
    "DeiTDistillationModule",
    "DistillationModule",
    "FeatureDistillation",
    "FitNetsTwoStage",
    "FoundationDistillThenProbe",
    "HasFrozenModels",
    "Method",
    "MultiStageMethod",
    "MultiTeacherDistillation",
    "MutualLearning",
    "Probe",
    "Stage",
    "Supervised",
]
