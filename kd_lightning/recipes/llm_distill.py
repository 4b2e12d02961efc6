"""``kd-llm-distill`` (``python -m kd_lightning.cli.llm_distill``): distil a causal-LM teacher into a student.

Top to bottom: seed -> loss -> tokenizer, teacher, student (built from the teacher) -> vocabulary check
-> data -> mode (``conf/llm/mode``: e.g. teacher top-k cached, teacher dropped) -> module -> fit -> summary.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf

from kd_lightning.engine.caching.store import write_json_atomic
from kd_lightning.engine.instantiate import build, build_trainer, log_run_config, parameter_count
from kd_lightning.engine.run_dir import announce, start_run
from kd_lightning.engine.threads import set_cpu_threads
from kd_lightning.engine.weights import freeze
from kd_lightning.llm.models import check_tokenizers
from kd_lightning.llm.modes import TrainingMode
from kd_lightning.methods.llm import LLMDistillationModule
from kd_lightning.recipes.fit import sync_csv_columns

log = logging.getLogger(__name__)


def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run one LM distillation job; returns the summary (metrics included), also written to summary.json."""
    start = time.perf_counter()
    run = start_run(cfg)
    if run.finished is not None:  # a requeued job of a run that already finished
        return run.finished
    out_dir, ckpt_path = run.out_dir, run.ckpt_path
    loss = build(cfg.llm.loss, "llm.loss")
    mode: TrainingMode = build(cfg.llm.mode, "llm.mode")
    tokenizer = build(cfg.llm.teacher.tokenizer, "llm.teacher.tokenizer")
    teacher = freeze(build(cfg.llm.teacher.model, "llm.teacher.model"))
    student = build(cfg.llm.student, "llm.student", teacher=teacher)
    set_cpu_threads(cfg.cpu_threads, [teacher, student], "cpu_threads")
    vocab = check_tokenizers(teacher, student, tokenizer)
    if loss.vocab_size is None:
        loss.vocab_size = vocab
    datamodule = build(cfg.llm.data, "llm.data", tokenizer=tokenizer)
    trainer: L.Trainer = build_trainer(cfg)

    cache = mode.teacher_cache(teacher, datamodule, loss, trainer, Path(cfg.paths.cache_dir))
    params = {"params/student": parameter_count(student), "params/teacher": parameter_count(teacher)}
    lora = OmegaConf.to_container(cfg.llm.lora, resolve=True) if cfg.llm.lora else None
    module = LLMDistillationModule(
        student=student,
        loss=loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        # With alpha = 0 (SFT on teacher text) the teacher never runs in training, only to report
        # val/kl_to_teacher.
        teacher=teacher if cache is None else None,
        scheduler=build(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        lmbda=mode.lmbda,
        generation=mode.generation,
        logit_cache=cache,
        lora=lora,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=cfg.seed,
        save_teacher=cfg.save_teacher,
    )
    params["params/trainable"] = sum(p.numel() for p in module.trainable_parameters())
    log_run_config(trainer, cfg, params)

    fit_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    if "val/loss" not in trainer.callback_metrics:  # max_steps ended the fit before any validation
        sync_csv_columns(trainer)
        trainer.validate(module, datamodule=datamodule, verbose=False)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    summary = {
        "metrics": {name: float(value) for name, value in trainer.callback_metrics.items()},
        **params,
        "mode": mode.name,
        "logit_cache": str(cache.path) if cache else None,
        "best_checkpoint": best,
        "seconds": {"fit": time.perf_counter() - fit_start, "total": time.perf_counter() - start},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if trainer.is_global_zero:
        write_json_atomic(out_dir / "summary.json", summary)
        announce(f"results: {out_dir} (summary.json, checkpoints/)")
    log.info("metrics: %s", {name: round(value, 4) for name, value in summary["metrics"].items()})
    return summary
