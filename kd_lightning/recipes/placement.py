"""Where a kd-distill run's teacher outputs come from (``teacher_cache``): resolved once per run, logged in
one line and recorded in the summary. ``teacher_cache=auto`` decides by the rules of
:class:`~kd_lightning.teacher.placement.AutoPlacement` and is replaced in the run's config by the cache it chose."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, open_dict

from kd_lightning.engine.instantiate import build
from kd_lightning.teacher.placement import AutoPlacement, Placement

log = logging.getLogger(__name__)


def place_teacher(
    cfg: DictConfig, method: type, loss: object, teachers: list[str]
) -> tuple[AutoPlacement | None, Placement | None]:
    """Before the data is built: the auto rules that need only the method and the loss. ``cfg.teacher_cache``
    then holds a provisional memory cache (so the data returns sample indices) or nothing."""
    node = cfg.get("teacher_cache")
    if not node or not str(node.get("_target_", "")).endswith("AutoPlacement"):
        return None, configured(cfg, teachers)
    auto: AutoPlacement = build(node, "teacher_cache")
    placement = auto.before_data(method, loss, teachers)
    with open_dict(cfg):
        cfg.teacher_cache = auto.cache_config(placement or Placement("memory", "provisional"))
    return auto, placement


def place_with_data(
    cfg: DictConfig, auto: AutoPlacement | None, placement: Placement | None, datamodule: object
) -> Placement:
    """After the data is built: the auto choice made final (the data's augmentation, the tables' size), written
    into ``cfg.teacher_cache`` and logged."""
    if auto is not None:
        placement = placement or auto.with_data(datamodule, int(cfg.data.num_classes))
        with open_dict(cfg):
            cfg.teacher_cache = auto.cache_config(placement)
    assert placement is not None
    log.info("teacher outputs: %s (%s)", placement.where, placement.reason)
    return placement


def configured(cfg: DictConfig, teachers: list[str]) -> Placement:
    """The placement a run's explicit ``teacher_cache`` asks for."""
    node = cfg.get("teacher_cache")
    if not teachers:
        return Placement("live", "no teacher")
    if not node:
        return Placement("live", "teacher_cache=none")
    where = "per_view" if "views" in node else str(node.get("location", "disk"))
    return Placement(where, "as configured (teacher_cache)")
