"""What ``kd-llm-distill`` does, top to bottom, from a composed Hydra config.

run start -> checks of the values -> the scheme (``conf/llm/method``) and its objective -> teachers, student
-> tokenizer pairing -> data, every row checked -> teacher cache (``conf/llm/teacher_cache``) -> scheme ->
fit -> summary (summary.json, summary.md).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.instantiate import build, build_trainer, log_run_config
from kd_lightning.engine.run_dir import announce, start_run
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.llm.memory import estimate_memory
from kd_lightning.llm.models import cast_teachers, teacher_dtype
from kd_lightning.recipes.fit import sync_csv_columns
from kd_lightning.recipes.llm_bug_checks import preflight_bugs
from kd_lightning.recipes.llm_components import (
    build_student,
    build_teachers,
    offer,
    pair_teachers,
    pair_tokenizers,
    parameter_counts,
    scheme_factory,
    serve_teacher,
    teacher_names,
)
from kd_lightning.recipes.llm_preflight import (
    check_finite_validation,
    check_metrics,
    check_resume_teacher,
    check_scheme,
    check_token_ids,
    check_values,
)
from kd_lightning.recipes.preflight import check_resume_checkpoint
from kd_lightning.reporting.summary import Summary

log = logging.getLogger(__name__)


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run one LM distillation job; returns the summary (metrics included), also written to summary.json."""
    start = time.perf_counter()
    check_values(cfg)
    teacher_dtype(cfg.llm.teacher.get("dtype"))  # refused before any model is built
    run = start_run(cfg)
    if run.finished is not None:  # a requeued job of a run that already finished
        return run.finished
    factory, loss_cfg = scheme_factory(cfg)
    loss = build(loss_cfg, "llm.method.loss" if "loss" in cfg.llm.method else "llm.loss") if loss_cfg else None
    names, cached = teacher_names(cfg.llm.teacher), bool(cfg.llm.get("teacher_cache"))
    check_scheme(factory, loss, names, cached, remote=False)
    hidden = build(cfg.llm.hidden, "llm.hidden") if cfg.llm.get("hidden") else None
    cross = loss is not None and loss.cross_tokenizer
    if hidden is not None:
        factory.func.check_hidden(cached, remote=False, cross_tokenizer=cross)  # type: ignore[attr-defined]
    trainer = build_trainer(cfg)
    check_metrics(factory, loss, names, trainer, cfg.optimized_metric)

    teachers = build_teachers(cfg.llm.teacher)
    check_scheme(factory, loss, names, cached, remote=teachers.remote)
    if hidden is not None:
        factory.func.check_hidden(cached, remote=teachers.remote, cross_tokenizer=cross)  # type: ignore[attr-defined]
    teacher, tokenizer = next(iter(teachers.models.values())), next(iter(teachers.tokenizers.values()))
    student, student_tokenizer = build_student(cfg.llm.student, teacher, tokenizer)
    cast_teachers(teachers.models, teacher_dtype(cfg.llm.teacher.get("dtype")))  # after layer_subset copied them
    set_cpu_threads(cfg.cpu_threads, [*teachers.models.values(), student], "cpu_threads")
    if teachers.combination is None:
        pairing = pair_tokenizers(loss, teacher, student, tokenizer, student_tokenizer)
        losses = None
    else:  # one loss per teacher: a cross-tokenizer loss binds its own vocabulary mapping
        losses = {name: loss if i == 0 else build(loss_cfg, "llm.loss") for i, name in enumerate(teachers.models)}
        pairing = pair_teachers(teachers, losses, student, student_tokenizer)
    datamodule = build(cfg.llm.data, "llm.data", **pairing.data)
    readers = teachers.models if pairing.teacher_reads_student else {}
    check_token_ids(datamodule, {"llm.student.model": student, **{f"llm.teacher.{n}": m for n, m in readers.items()}})

    live = teachers.combination is None and isinstance(teacher, nn.Module)
    cache = served = None
    if cached:
        cache = build(cfg.llm.teacher_cache, "llm.teacher_cache")
        cache = cache.fill(teacher, datamodule, loss, trainer.strategy.root_device)
    elif teachers.remote and teachers.combination is None and loss is not None and loss.needs_teacher:
        served = serve_teacher(cfg.llm.teacher, teacher, loss, student, datamodule)
    module = offer(
        factory,
        student=student,
        loss=loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        # Without a use in training (SFT, a cache) the teacher is kept only to report val/kl_to_teacher.
        teacher=teacher if live and cache is None and (pairing.teacher_reads_student or loss is not None) else None,
        teachers=teachers.models if teachers.combination is not None else None,
        combination=teachers.combination,
        losses=losses,
        logit_cache=cache,
        served_teacher=served,
        lora=OmegaConf.to_container(cfg.llm.lora, resolve=True) if cfg.llm.lora else None,
        pad_token_id=student_tokenizer.pad_token_id,
        eos_token_id=student_tokenizer.eos_token_id,
        seed=cfg.seed,
        save_teacher=cfg.save_teacher,
        nonfinite=cfg.llm.nonfinite,
        nonfinite_check_every=cfg.llm.get("nonfinite_check_every", "auto"),
        aligned=datamodule.encoder if loss is not None and loss.cross_tokenizer else None,
        vocab_size=pairing.vocab_size,
        hidden=hidden,
    )
    module.before_fit(datamodule, student_tokenizer, Path(cfg.paths.cache_dir))
    if run.ckpt_path:
        check_resume_checkpoint(run.ckpt_path, module)
        check_resume_teacher(run.ckpt_path, module, cfg.allow_other_teacher)
    params = parameter_counts(student, module, teachers)
    log_run_config(trainer, cfg, params)
    if trainer.is_global_zero:  # the estimated peak memory per device, by part (kd_lightning/llm/memory.py)
        rows = getattr(datamodule, "pack_length", None) or cfg.llm.data.max_length
        trained, models = module.trainable_parameters(), [module.teacher, *module.teachers.values()]  # those it runs
        announce(estimate_memory(module.student, models, trained, datamodule.batch_size, rows, module.loss).describe())

    preflight_bugs(module, datamodule, student_tokenizer, cfg.llm.get("preflight", True))  # llm_bug_checks.py
    fit_start = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=run.ckpt_path)
        if "val/loss" not in trainer.callback_metrics:  # max_steps ended the fit before any validation
            sync_csv_columns(trainer)
            trainer.validate(module, datamodule=datamodule, verbose=False)
    finally:
        if served is not None:
            served.close()
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    check_finite_validation(metrics, module)
    frozen = [count for name, count in params.items() if name.startswith("params/teacher")]
    summary = Summary(
        metrics=metrics,
        student_params=params["params/student"],
        teacher_params=sum(frozen) if frozen else None,
        seconds={"fit": time.perf_counter() - fit_start, "total": time.perf_counter() - start},
        best_checkpoint=trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else "",
        config=OmegaConf.to_container(cfg, resolve=True),
        details={"method": module.config_name(), "logit_cache": str(cache.path) if cache else None, **params},
    )
    if trainer.is_global_zero:
        summary.write(run.out_dir)
        announce(f"results: {run.out_dir} (summary.json, summary.md, checkpoints/)")
    log.info("metrics: %s", {name: round(value, 4) for name, value in metrics.items()})
    return summary.as_dict()
