"""How teacher token distributions reach the loss (``conf/llm/mode``): one strategy class per mode.

- :class:`OffPolicy`: the live teacher scores the dataset's sequences.
- :class:`OnPolicy`: GKD (Agarwal et al. 2024): with probability ``lmbda`` a batch is replaced by
  completions the student samples; the live teacher scores them.
- :class:`CachedTeacher`: the teacher's top-k next-token log-probabilities for every dataset token are
  computed once (:class:`~kd_lightning.engine.caching.token_outputs.LogitCache`) and read back; the teacher
  is then dropped from training.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from kd_lightning.engine.caching.token_outputs import LogitCache
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.token_loss import TokenDistillationLoss

log = logging.getLogger(__name__)


@dataclass
class TrainingMode:
    """Base strategy: the live teacher on dataset sequences (``lmbda`` = 0: never on-policy)."""

    name: str = "off_policy"
    lmbda: float = 0.0
    generation: Mapping[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        if not 0.0 <= self.lmbda <= 1.0:
            raise ConfigError(f"llm.mode.lmbda={self.lmbda} must be in [0, 1] (the fraction of on-policy batches)")
        self.generation = dict(self.generation) if self.generation is not None else None

    def teacher_cache(
        self,
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        loss: TokenDistillationLoss,
        trainer: L.Trainer,
        cache_dir: Path,
    ) -> LogitCache | None:
        """The cache the loss reads instead of running the teacher; None: the teacher runs live."""
        return None


@dataclass
class OffPolicy(TrainingMode):
    """Off-policy: train on the dataset's sequences (reference or teacher-written completions)."""


@dataclass
class OnPolicy(TrainingMode):
    """On-policy GKD: a fraction ``lmbda`` of batches sampled from the student (``generation``:
    ``transformers`` ``generate()`` sampling arguments)."""

    name: str = "on_policy"
    lmbda: float = 1.0


@dataclass
class CachedTeacher(TrainingMode):
    """Offline teacher: its ``top_k`` next-token log-probs (+ tail mass) cached once, then not run."""

    name: str = "teacher_cache"
    top_k: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lmbda > 0:
            raise ConfigError(
                "llm/mode=teacher_cache holds teacher outputs for dataset sequences only; on-policy samples "
                "need the live teacher (llm/mode=on_policy)"
            )
        if self.top_k < 1:
            raise ConfigError(f"llm.mode.top_k={self.top_k} must be >= 1")

    def teacher_cache(
        self,
        teacher: nn.Module,
        datamodule: L.LightningDataModule,
        loss: TokenDistillationLoss,
        trainer: L.Trainer,
        cache_dir: Path,
    ) -> LogitCache | None:
        if not loss.needs_teacher:
            return None
        start = time.perf_counter()
        cache = LogitCache.build(
            teacher.to(trainer.strategy.root_device) if isinstance(teacher, nn.Module) else teacher,
            [datamodule.train_dataloader(), datamodule.val_dataloader()],
            cache_dir / "llm_logits",
            top_k=self.top_k,
            temperature=loss.temperature,
            vocab_size=loss.vocab_size,
        )
        log.info("Teacher logit cache %s (%.1f s)", cache.path, time.perf_counter() - start)
        return cache
