"""``conf/llm/teacher_cache``: how an LM teacher's outputs are stored instead of running it every step.

:class:`TopKCache` (``llm/teacher_cache=top_k``): the teacher's ``top_k`` next-token log-probabilities (+
the tail mass) for every training and validation token, computed once at temperature 1 into a
content-keyed :class:`~kd_lightning.llm.logit_cache.LogitCache` and read back re-tempered to the loss's
temperature (a temperature sweep shares one cache); the teacher then leaves training (the
sparse top-k KD of Raman et al. 2023 and DistillKit's offline logits). ``llm/teacher_cache=none``: the
teacher runs live.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.llm.logit_cache import LogitCache

log = logging.getLogger(__name__)


class TopKCache:
    """Fills (or finds) the :class:`~kd_lightning.llm.logit_cache.LogitCache` of one teacher on a datamodule.

    Args:
        top_k: stored token ids per position (the rest is one tail bucket).
        directory: the cache root (keyed below it by teacher weights, data, top_k, vocabulary; not temperature).
    """

    def __init__(self, top_k: int = 32, directory: str = "llm_logits") -> None:
        check_type(top_k, int, "llm.teacher_cache.top_k")
        if top_k < 1:
            raise ConfigError(f"llm.teacher_cache.top_k={top_k} must be >= 1")
        self.top_k = top_k
        self.directory = Path(directory)

    def fill(self, teacher: Any, datamodule: L.LightningDataModule, loss: Any, device: Any) -> LogitCache:
        """The cache of ``teacher`` over the training and validation batches, read at ``loss``'s temperature,
        over its shared vocabulary (a module teacher runs on ``device``; a remote one is asked once per token)."""
        start = time.perf_counter()
        cache = LogitCache.build(
            teacher.to(device) if isinstance(teacher, nn.Module) else teacher,
            [datamodule.train_dataloader(), datamodule.val_dataloader()],
            self.directory,
            top_k=self.top_k,
            temperature=loss.temperature,
            vocab_size=loss.vocab_size,
        )
        log.info("Teacher logit cache %s (%.1f s)", cache.path, time.perf_counter() - start)
        return cache
