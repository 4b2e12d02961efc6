"""The pieces a recipe assembles a method from: the method's constructor, what it needs of the data, its
teachers, and what it trains."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kd_lightning.engine.instantiate import build, build_partial, parameter_count
from kd_lightning.engine.runtime import Runtime
from kd_lightning.methods.base import Method
from kd_lightning.recipes.fit import labelled_only
from kd_lightning.recipes.teacher import obtain_teacher
from kd_lightning.teacher import Teacher

log = logging.getLogger(__name__)


def method_factory(cfg: DictConfig) -> tuple[Callable[..., Method], dict[str, DictConfig]]:
    """The method's constructor (``method`` without its ``teachers``) and its teacher configs by name."""
    factory, teachers = build_partial(cfg.method, "method", Method, "kd_lightning.methods.Method", pop="teachers")
    return factory, dict((teachers or {}).items())


def offer(factory: Callable[..., Method], **ingredients: Any) -> Method:
    """Call the method's constructor with the ingredients it names (a recipe offers the same set to every
    method: student, teachers, loss, optimizer, scheduler, num_classes, runtime)."""
    parameters = inspect.signature(factory).parameters
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    return factory(**{name: value for name, value in ingredients.items() if takes_all or name in parameters})


def data_overrides(cfg: DictConfig, method: type[Method], loss: Any, cached_teachers: bool) -> dict[str, Any]:
    """What the method needs of the data: no unlabelled transfer set if it cannot learn from one, sample
    indices if it (or the teacher-output cache) needs them."""
    overrides: dict[str, Any] = {}
    if not method.uses_unlabelled_data:
        overrides |= labelled_only(cfg.data)
        if cfg.data.get("transfer_samples"):
            log.info("%s learns from labelled samples only: the unlabelled transfer set is left out", method.__name__)
    if method.needs_sample_index(loss, cached_teachers) and "return_index" in cfg.data and not cfg.data.return_index:
        log.info("the loss or teacher_cache needs dataset sample indices: data.return_index set to true")
        overrides["return_index"] = True
    return overrides


def teachers_for(
    cfg: DictConfig,
    configs: dict[str, DictConfig],
    models: dict[str, torch.nn.Module],
    inputs: dict[str, torch.nn.Module | None],
    out_dir: Path,
    runtime: Runtime,
) -> dict[str, Teacher]:
    """Every teacher with its weights (checkpoint, factory, cache or trained), its input adapter and how it runs."""
    teachers = {}
    for name, teacher_cfg in configs.items():
        provenance = obtain_teacher(cfg, teacher_cfg, name, models[name], out_dir, inputs[name])
        cache = build(cfg.teacher_cache, "teacher_cache") if cfg.get("teacher_cache") else None
        teachers[name] = Teacher(
            models[name],
            name,
            runtime.teacher_precision,
            cache,
            runtime.reuse_val_teacher_outputs,
            provenance,
            inputs[name],
        )
    return teachers


def parameter_counts(method: Method, student: torch.nn.Module) -> dict[str, int]:
    """``params/student``, ``params/adapters`` (what the loss trains beside the student: adapters, heads),
    ``params/teacher`` (every frozen model) and ``params/peers`` (other trainable models, e.g. mutual
    learning's peers), the last three only when non-zero."""
    frozen = sum(parameter_count(model) for model in method.frozen_models().values())
    loss = getattr(method, "loss", None)
    adapters = parameter_count(loss) if isinstance(loss, torch.nn.Module) else 0
    counts = {
        "params/student": parameter_count(student),
        "params/adapters": adapters,
        "params/teacher": frozen,
        "params/peers": parameter_count(method) - parameter_count(student) - frozen - adapters,
    }
    return {name: count for name, count in counts.items() if count or name == "params/student"}
