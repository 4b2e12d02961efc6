"""The teacher layer: the :class:`Teacher` object (``core``) and its output caches (``outputs``: logit
tables; ``views``: stored augmented views, FKD)."""

from kd_lightning.teacher.core import Provenance, Teacher

__all__ = ["Provenance", "Teacher"]
