"""What ``kd-distill`` does, top to bottom, from a composed Hydra config.

seed -> loss, runtime, method factory (``conf/method``) -> data (with what the method needs) -> student
and teachers built, class counts checked -> teacher weights (checkpoint, cache, or train-and-cache) ->
method -> fit -> test (last and best checkpoint) -> scratch-student baseline -> summary.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.accelerators import CPUAccelerator
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd_lightning.engine.batches import batch_size as rows
from kd_lightning.engine.checks import check_class_counts, check_run_options, check_trainer, checked_factory
from kd_lightning.engine.class_names import align_classes, data_class_names
from kd_lightning.engine.instantiate import build, build_trainer, log_run_config, parameter_count
from kd_lightning.engine.run_dir import announce, start_run
from kd_lightning.engine.runtime import Runtime
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.engine.weights import load_weights
from kd_lightning.methods.base import Method
from kd_lightning.recipes.components import data_overrides, method_factory, offer, parameter_counts, teachers_for
from kd_lightning.recipes.fit import run_test
from kd_lightning.recipes.placement import place_teacher, place_with_data
from kd_lightning.recipes.preflight import check_option_names, check_resume_checkpoint, preflight
from kd_lightning.recipes.stages import distill_stages, multi_stage_method
from kd_lightning.recipes.teacher import check_teacher_tokenizer, config_key, input_adapter, scratch_baseline
from kd_lightning.reporting.summary import Summary
from kd_lightning.reporting.teacher_cost import teacher_costs
from kd_lightning.reporting.tracking import finish_runs
from kd_lightning.teacher.placement import Placement
from kd_lightning.teacher_inputs import adapted

log = logging.getLogger(__name__)


def evaluate(trainer: L.Trainer, method: Method, datamodule: L.LightningDataModule) -> tuple[dict[str, float], str]:
    """The fit's metrics plus the test split at the last epoch (``test/*_last``) and at the best-validation
    checkpoint (``test/*``); and that checkpoint's path."""
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last_epoch = run_test(trainer, method, datamodule)
    metrics.update({f"{name}_last": value for name, value in last_epoch.items() if name.startswith("test/")})
    metrics.update(run_test(trainer, method, datamodule, ckpt_path=best or None))
    return metrics, best


@dataclass
class Parts:
    """What a run is assembled from, built and checked before any training."""

    runtime: Runtime
    loss: Any
    factory: Callable[..., Method]
    teacher_cfgs: dict[str, DictConfig]
    datamodule: L.LightningDataModule
    student: nn.Module
    models: dict[str, nn.Module]
    inputs: dict[str, nn.Module | None]
    optimizer: Callable[..., Any]
    scheduler: Callable[..., Any] | None
    trainer: L.Trainer
    placement: Placement


def assemble(cfg: DictConfig) -> Parts:
    """Build every part of the run from ``cfg`` and check them (:func:`preflight`): bad input fails here,
    before a teacher is trained or a step is taken. Records the data overrides the method needs in ``cfg``."""
    check_run_options(cfg)
    check_trainer(cfg.trainer)
    runtime: Runtime = build(cfg.runtime, "runtime")
    loss = build(cfg.loss, "loss")
    factory, teacher_cfgs = method_factory(cfg)
    check_option_names(factory)
    check_teacher_tokenizer(cfg.data, teacher_cfgs)
    auto, placement = place_teacher(cfg, factory.func, loss, list(teacher_cfgs))
    overrides = data_overrides(cfg, factory.func, loss, bool(teacher_cfgs) and bool(cfg.get("teacher_cache")))
    with open_dict(cfg):  # recorded in the summary's config as run
        cfg.data.update(overrides)
    datamodule = build(cfg.data, "data")
    placement = place_with_data(cfg, auto, placement, datamodule)
    student = build(cfg.student.model, "student.model")
    if cfg.student.get("checkpoint"):  # a stage that continues an earlier one's student (Stage.student_from)
        load_weights(student, cfg.student.checkpoint, key="student.checkpoint")
    models = {name: build(node.model, f"{config_key(name)}.model") for name, node in teacher_cfgs.items()}
    inputs = {name: input_adapter(node, name) for name, node in teacher_cfgs.items()}
    check_class_counts(
        datamodule.example_input(),
        cfg.data.num_classes,
        {
            "student": student,
            **{config_key(name): adapted(model, inputs[name]) for name, model in models.items()},
        },
        {"student": cfg.student.model, **{config_key(name): node.model for name, node in teacher_cfgs.items()}},
    )
    named = {"student": student, **{config_key(name): model for name, model in models.items()}}
    align_classes(named, data_class_names(datamodule))
    optimizer = checked_factory(cfg.optimizer, "optimizer")
    scheduler = checked_factory(cfg.scheduler, "scheduler") if cfg.scheduler else None
    trainer = build_trainer(cfg)
    processes = trainer.num_devices if isinstance(trainer.accelerator, CPUAccelerator) else 1
    set_cpu_threads(runtime.cpu_threads, [student, *models.values()], "runtime.cpu_threads", processes)
    preflight(cfg, factory, loss, datamodule, {"student": student, **models}, teacher_cfgs, trainer)
    return Parts(
        runtime,
        loss,
        factory,
        teacher_cfgs,
        datamodule,
        student,
        models,
        inputs,
        optimizer,
        scheduler,
        trainer,
        placement,
    )


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run a full distillation job; returns the summary (metrics included). A multi-stage method runs
    this once per stage (:mod:`kd_lightning.recipes.stages`)."""
    if (stages := multi_stage_method(cfg)) is not None:
        return distill_stages(cfg, stages, run_stage=distill, check_stage=assemble)
    start = time.perf_counter()
    run = start_run(cfg)
    if run.finished is not None:  # a requeued job of a run that already finished
        return run.finished
    out_dir, ckpt_path = run.out_dir, run.ckpt_path
    parts = assemble(cfg)
    runtime, loss, factory, teacher_cfgs = parts.runtime, parts.loss, parts.factory, parts.teacher_cfgs
    datamodule, student, trainer = parts.datamodule, parts.student, parts.trainer
    teachers = teachers_for(cfg, teacher_cfgs, parts.models, parts.inputs, out_dir, runtime)

    L.seed_everything(cfg.seed, workers=True)
    method = offer(
        factory,
        student=student,
        teachers=teachers,
        loss=loss,
        optimizer=parts.optimizer,
        scheduler=parts.scheduler,
        num_classes=cfg.data.num_classes,
        runtime=runtime,
    )
    method.prepare(datamodule)  # sizes adapters (and per-sample memories) now, so they are counted below
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, method)
    params = parameter_counts(method, student)
    log_run_config(trainer, cfg, params)

    example = datamodule.example_input()
    batch_size = int(cfg.data.get("batch_size") or rows(example))
    costs = teacher_costs(teachers, example, batch_size, trainer.strategy.root_device)
    distill_start = time.perf_counter()
    trainer.fit(method, datamodule=method.training_data(datamodule), ckpt_path=ckpt_path)
    distill_seconds = time.perf_counter() - distill_start
    metrics, best = evaluate(trainer, method, datamodule)

    scratch = scratch_baseline(cfg, out_dir) if cfg.compare_scratch and factory.func.compared_with_scratch else None
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
            **({"scratch_fit": scratch["fit_seconds"]} if scratch else {}),
            "total": time.perf_counter() - start,
        },
        best_checkpoint=best,
        config=OmegaConf.to_container(cfg, resolve=True),
        teacher_costs=costs,
        cpu_threads=torch.get_num_threads(),
        details={"teacher_placement": {"where": parts.placement.where, "reason": parts.placement.reason}},
        teachers={
            name: {"params": parameter_count(t.model), "source": t.provenance.source} for name, t in teachers.items()
        },
    )
    finish_runs(trainer.loggers, summary.as_dict())
    if trainer.is_global_zero:  # strategy=ddp runs this whole function once per process
        summary.write(out_dir)
        summary.print()
        announce(f"results: {out_dir} (summary.json, summary.md, checkpoints/); report: kd-report {out_dir}")
    return summary.as_dict()
