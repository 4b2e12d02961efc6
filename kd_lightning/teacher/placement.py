"""``teacher_cache=auto`` (the default): where the teacher's outputs come from, chosen per run.

The teacher's logits are computed once and kept, in memory below ``memory_limit_mib`` and on disk above
it (:class:`~kd_lightning.teacher.outputs.TeacherOutputCache`, float32, so a cached run distils from the
same numbers as a live one), whenever that gives the same training as running the teacher every step:

- the method takes cached teacher outputs (``Method.caches_teacher_outputs``; not data-free KD, whose
  inputs are generated every step);
- the loss distils (``alpha > 0``) and every term reads the teachers' logits only (no feature layer);
- the data fixes each sample's input (no random augmentation: ``random_augmentation = False``).

Otherwise the teacher runs live. Stored augmented views (``teacher_cache=per_view``) replay a fixed set of
views instead of fresh augmentation, a different training, so auto never picks them: ask for them by name.
The choice and its reason are one log line and ``teacher_placement`` in the summary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kd_lightning.data.contract import CacheableData, HasTrainSize, is_deterministic
from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.base import DistillationLoss


@dataclass(frozen=True)
class Placement:
    """Where the teacher's outputs come from (``live``, ``memory`` or ``disk``) and why."""

    where: str
    reason: str

    @property
    def cached(self) -> bool:
        return self.where != "live"


class AutoPlacement:
    """The ``teacher_cache=auto`` config: the rules of the module docstring.

    Args:
        memory_limit_mib: the largest table set (every split, float32) kept in memory; larger goes to disk.
        directory: where disk tables live (shared by every run and sweep job with the same teacher and data).
    """

    def __init__(self, memory_limit_mib: float = 512, directory: str = "teacher_outputs") -> None:
        check_type(memory_limit_mib, (int, float), "teacher_cache.memory_limit_mib")
        if memory_limit_mib < 0:
            raise ConfigError(f"teacher_cache.memory_limit_mib={memory_limit_mib} must be >= 0")
        self.memory_limit_mib = float(memory_limit_mib)
        self.directory = directory

    def before_data(self, method: type, loss: Any, teachers: list[str]) -> Placement | None:
        """The live teacher if the method or the loss rules a cache out (decided before the data is built);
        None: a cache fits them, the data decides (:meth:`with_data`)."""
        if not teachers:
            return Placement("live", "no teacher")
        if not getattr(method, "caches_teacher_outputs", False):
            return Placement("live", f"{method.__name__} cannot read cached teacher outputs")
        if not isinstance(loss, DistillationLoss) or not loss.needs_teacher:
            return Placement("live", "the loss does not distil (loss.alpha = 0 or no term)")
        layered = sorted(name for name in teachers if loss.layers(name))
        if layered:
            return Placement("live", f"a loss term reads a layer of {layered[0]}, not only its logits")
        return None

    def with_data(self, datamodule: object, num_classes: int) -> Placement:
        """Memory or disk for data that fixes each sample's input, else live."""
        if not isinstance(datamodule, CacheableData) or not is_deterministic(datamodule):
            why = "random augmentation" if isinstance(datamodule, CacheableData) else "no content identity"
            return Placement("live", f"the data has {why}, so stored outputs would be stale")
        samples = datamodule.num_train_samples if isinstance(datamodule, HasTrainSize) else 0
        mib = 4 * num_classes * samples * 1.5 / 2**20  # training split, plus about half again for val / test
        if mib <= self.memory_limit_mib:
            return Placement("memory", f"logit-only loss, fixed inputs, about {mib:.1f} MiB of logits")
        return Placement("disk", f"logit-only loss, fixed inputs, about {mib:.0f} MiB of logits (> memory limit)")

    def cache_config(self, placement: Placement) -> Mapping[str, Any] | None:
        """The ``teacher_cache`` node the choice stands for (None: live)."""
        if not placement.cached:
            return None
        node = {"_target_": "kd_lightning.teacher.outputs.TeacherOutputCache", "location": placement.where}
        directory = self.directory if placement.where == "disk" else None  # memory: this process only
        return {**node, "dtype": "float32", "top_k": None, "directory": directory}
