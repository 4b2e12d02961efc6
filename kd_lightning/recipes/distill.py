"""What ``kd-distill`` does, top to bottom, from a composed Hydra config.

seed -> loss, runtime, method factory (``conf/method``) -> data (with what the method needs) -> student
and teachers built, class counts checked -> teacher weights (checkpoint, cache, or train-and-cache) ->
method -> fit -> test (last and best checkpoint) -> scratch-student baseline -> summary.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.engine.checks import check_class_counts
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build, build_trainer, log_run_config, parameter_count
from kd_lightning.engine.run_dir import start_run
from kd_lightning.engine.runtime import Runtime
from kd_lightning.methods.base import Method
from kd_lightning.recipes.fit import labelled_only, run_test
from kd_lightning.recipes.teacher import config_key, obtain_teacher, scratch_baseline
from kd_lightning.reporting.summary import Summary
from kd_lightning.reporting.tracking import finish_runs
from kd_lightning.teacher import Teacher

log = logging.getLogger(__name__)


def method_factory(cfg: DictConfig) -> tuple[Callable[..., Method], dict[str, DictConfig]]:
    """The method's constructor (``method`` without its ``teachers``) and its teacher configs by name."""
    method_cfg = cfg.method.copy()
    with open_dict(method_cfg):
        teachers = dict((method_cfg.pop("teachers", None) or {}).items())
    factory = build(method_cfg, "method")
    cls = getattr(factory, "func", None)
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ConfigError(
            f"method._target_={cfg.method.get('_target_')} is not a kd_lightning Method built with _partial_: true; "
            "subclass kd_lightning.methods.Method and set _partial_: true"
        )
    return factory, teachers


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
    cfg: DictConfig, configs: dict[str, DictConfig], models: dict[str, torch.nn.Module], out_dir: Path, runtime: Runtime
) -> dict[str, Teacher]:
    """Every teacher with its weights (checkpoint, factory, cache or trained) and how it runs."""
    teachers = {}
    for name, teacher_cfg in configs.items():
        provenance = obtain_teacher(cfg, teacher_cfg, name, models[name], out_dir)
        cache = build(cfg.teacher_cache, "teacher_cache") if cfg.get("teacher_cache") else None
        teachers[name] = Teacher(
            models[name], name, runtime.teacher_precision, cache, runtime.reuse_val_teacher_outputs, provenance
        )
    return teachers


def parameter_counts(method: Method, student: torch.nn.Module) -> dict[str, int]:
    """``params/student``, ``params/adapters`` (what else the method trains: loss adapters, heads) and
    ``params/teacher`` (every frozen model), the last two only when non-zero."""
    frozen = sum(parameter_count(model) for model in method.frozen_models().values())
    counts = {
        "params/student": parameter_count(student),
        "params/adapters": parameter_count(method) - parameter_count(student) - frozen,
        "params/teacher": frozen,
    }
    return {name: count for name, count in counts.items() if count or name == "params/student"}


def evaluate(trainer: L.Trainer, method: Method, datamodule: L.LightningDataModule) -> tuple[dict[str, float], str]:
    """The fit's metrics plus the test split at the last epoch (``test/*_last``) and at the best-validation
    checkpoint (``test/*``); and that checkpoint's path."""
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last_epoch = run_test(trainer, method, datamodule)
    metrics.update({f"{name}_last": value for name, value in last_epoch.items() if name.startswith("test/")})
    metrics.update(run_test(trainer, method, datamodule, ckpt_path=best or None))
    return metrics, best


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run a full distillation job; returns the summary (metrics included)."""
    start = time.perf_counter()
    run = start_run(cfg)
    if run.finished is not None:  # a requeued job of a run that already finished
        return run.finished
    out_dir, ckpt_path = run.out_dir, run.ckpt_path
    runtime: Runtime = build(cfg.runtime, "runtime")
    if runtime.cpu_threads:
        torch.set_num_threads(runtime.cpu_threads)
    loss = build(cfg.loss, "loss")
    factory, teacher_cfgs = method_factory(cfg)
    overrides = data_overrides(cfg, factory.func, loss, bool(teacher_cfgs) and bool(cfg.get("teacher_cache")))
    with open_dict(cfg):  # recorded in the summary's config as run
        cfg.data.update(overrides)
    datamodule = build(cfg.data, "data")
    student = build(cfg.student.model, "student.model")
    models = {name: build(node.model, f"{config_key(name)}.model") for name, node in teacher_cfgs.items()}
    check_class_counts(
        datamodule.example_input(),
        cfg.data.num_classes,
        student=student,
        **{config_key(n): m for n, m in models.items()},
    )
    teachers = teachers_for(cfg, teacher_cfgs, models, out_dir, runtime)

    L.seed_everything(cfg.seed, workers=True)
    method = offer(
        factory,
        student=student,
        teachers=teachers,
        loss=loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        num_classes=cfg.data.num_classes,
        runtime=runtime,
    )
    method.prepare(datamodule)  # sizes adapters (and per-sample memories) now, so they are counted below
    trainer = build_trainer(cfg)
    params = parameter_counts(method, student)
    log_run_config(trainer, cfg, params)

    distill_start = time.perf_counter()
    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
    distill_seconds = time.perf_counter() - distill_start
    metrics, best = evaluate(trainer, method, datamodule)

    scratch = scratch_baseline(cfg, out_dir) if cfg.compare_scratch and teachers else None
    first = next(iter(teachers.values()), None)
    summary = Summary(
        metrics=metrics,
        student_params=params["params/student"],
        teacher_params=params.get("params/teacher"),
        adapter_params=params.get("params/adapters", 0),
        teacher_source=first.provenance.source if first else None,
        scratch=scratch,
        seconds={
            "teacher_fit": sum(t.provenance.fit_seconds for t in teachers.values()),
            "distill": distill_seconds,
            "total": time.perf_counter() - start,
        },
        best_checkpoint=best,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    finish_runs(trainer.loggers, summary.as_dict())
    if trainer.is_global_zero:  # strategy=ddp runs this whole function once per process
        summary.write(out_dir)
        summary.print()
    return summary.as_dict()
