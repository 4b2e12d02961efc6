"""The teacher layer: the :class:`Teacher` object (``core``) and its output caches (``outputs``: logit
tables, filled by every process a shard each through ``shards``; ``views``: stored augmented views, FKD;
``lookup``: a memory table's rows looked up on the device); ``placement``: where a run's teacher outputs
come from (``teacher_cache=auto``), imported directly."""

from kd_lightning.teacher.core import Provenance, Teacher
from kd_lightning.teacher.outputs import TeacherOutputCache
from kd_lightning.teacher.views import TeacherViewCache

__all__ = ["Provenance", "Teacher", "TeacherOutputCache", "TeacherViewCache"]
