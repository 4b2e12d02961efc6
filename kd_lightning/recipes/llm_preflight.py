"""What ``kd-llm-distill`` checks before any training step: the values of the command line, the scheme's
own rules, the metrics it will log, every row's token ids, and a resumed checkpoint's teacher."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from kd_lightning.engine.checks import (
    check_constructor_options,
    check_monitored,
    check_run_options,
    check_trainer,
    checked_factory,
)
from kd_lightning.engine.errors import ConfigError, TrainingDiverged, check_type
from kd_lightning.engine.nonfinite import check_nonfinite_settings
from kd_lightning.methods.lm.base import LMMethod

log = logging.getLogger(__name__)

#: What kd-llm-distill passes every scheme itself (left out of the options a misspelt ``llm.method`` key lists).
LM_OFFERED = frozenset(
    {"student", "loss", "optimizer", "scheduler", "teacher", "teachers", "combination", "losses", "logit_cache"}
    | {"lora", "pad_token_id", "eos_token_id", "seed", "save_teacher", "nonfinite", "nonfinite_check_every"}
    | {"aligned", "vocab_size", "served_teacher"}
)
#: The largest learning rate accepted: beyond it one step moves weights by more than their scale.
MAX_LM_LR = 1.0


def check_values(cfg: DictConfig) -> None:
    """Types and ranges of the run's own options, the training budget and device count, the optimizer."""
    check_run_options(cfg)
    check_type(cfg.get("allow_other_teacher", False), bool, "allow_other_teacher")
    check_nonfinite_settings(cfg.llm.get("nonfinite", "error"), cfg.llm.get("nonfinite_check_every", "auto"), "llm")
    check_trainer(cfg.trainer)
    optimizer = checked_factory(cfg.optimizer, "optimizer")
    lr = optimizer.keywords.get("lr", 0.0)
    if lr > MAX_LM_LR:
        raise ConfigError(
            f"optimizer.lr={lr} would wreck the student in one step (LM fine-tuning uses about 1e-6 to 1e-3); "
            f"set optimizer.lr <= {MAX_LM_LR}"
        )
    if cfg.get("scheduler"):
        checked_factory(cfg.scheduler, "scheduler")


def check_scheme(
    factory: Callable[..., LMMethod], loss: Any, teachers: Sequence[str], cached: bool, remote: bool
) -> None:
    """The scheme's rules (:meth:`LMMethod.check_options`, :meth:`LMMethod.check_config`) and that the
    command line sets no loss the scheme does not read."""
    method: type[LMMethod] = factory.func  # type: ignore[attr-defined]
    check_constructor_options(factory, "llm.method", LM_OFFERED)
    method.check_options(factory.keywords)  # type: ignore[attr-defined]
    method.check_config(loss, teachers, cached, remote)
    if loss is None or not method.uses_loss:
        unread = [o for o in command_line() if o.lstrip("+~").startswith(("llm/loss=", "llm.loss."))]
        if unread:
            raise ConfigError(
                f"{unread[0]}: llm/method={method.config_name()} does not read llm.loss"
                + (" (its objective is llm.method.loss)" if loss is not None else "")
            )


def command_line() -> list[str]:
    """The overrides of the command line (none outside a Hydra run)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_metrics(
    factory: Callable[..., LMMethod], loss: Any, teachers: Sequence[str], trainer: L.Trainer, metric: str
) -> None:
    """``optimized_metric`` and every monitored metric will be logged by this scheme."""
    names = factory.func.metric_names(loss, teachers)  # type: ignore[attr-defined]
    check_monitored(names, trainer.callbacks, metric)


def check_token_ids(datamodule: L.LightningDataModule, models: Mapping[str, Any]) -> None:
    """Every row of every split has a token to learn and token ids each model has a logit for (``models``:
    config key -> model reading the student's tokens)."""
    datamodule.setup()
    splits: Mapping[str, list[dict[str, Any]]] = getattr(datamodule, "splits", {})
    if not splits.get("train"):
        raise ConfigError("llm.data has no training example; check llm.data.train_file / train_prompts")
    largest = max(max(ids(example), default=0) for rows in splits.values() for example in rows)
    for key, model in models.items():
        if isinstance(model, nn.Module) and largest >= (rows := model.get_output_embeddings().weight.shape[0]):
            raise ConfigError(
                f"llm.data holds token id {largest} but {key} has {rows} output logits; build {key} for this "
                "tokenizer (vocab_size) or use the model's own tokenizer"
            )


def ids(example: Mapping[str, Any]) -> Iterable[int]:
    """The student-side token ids of one encoded example."""
    return [*example.get("prompt", []), *example.get("completion", [])]


def check_resume_teacher(ckpt_path: str | None, method: LMMethod, allow: bool) -> None:
    """A checkpoint distilled from other teachers (weights, or logit cache) than this run's is refused,
    unless ``allow_other_teacher=true``."""
    if not ckpt_path:
        return
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True, mmap=True)
    stored = ((checkpoint.get("kd_lightning") or {}) if isinstance(checkpoint, dict) else {}).get("teachers") or {}
    current = method.resume_state()["teachers"]
    differing = sorted(name for name in set(stored) | set(current) if stored.get(name) != current.get(name))
    if not differing:
        return
    message = f"ckpt_path={ckpt_path} was distilled from other teachers than this run's ({differing})"
    if not allow:
        raise ConfigError(f"{message}; resume with the same llm.teacher, or set allow_other_teacher=true")
    log.warning("%s; resuming anyway (allow_other_teacher=true)", message)


def check_finite_validation(metrics: Mapping[str, float], method: LMMethod) -> None:
    """A run whose validation loss came out non-finite failed, whatever the steps did."""
    value = metrics.get("val/loss")
    if value is not None and not math.isfinite(value):
        raise TrainingDiverged(f"the validation loss is {value} after training: {method.divergence_advice}")
