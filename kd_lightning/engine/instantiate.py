"""Building objects from config nodes: one-line errors, callbacks, loggers, trainers, parameter counts."""

from __future__ import annotations

import sys
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from kd_lightning.engine.checkpointing import AtomicCheckpointIO
from kd_lightning.engine.errors import ConfigError, ModelConfigError


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces a :class:`ConfigError` raised inside as itself and turns
    any other failure into a :class:`ConfigError` naming ``key``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause: BaseException = error
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ModelConfigError) and (key == "model" or key.endswith(".model")):
            raise ConfigError(cause.at(key)) from None  # keys named under the model's own node
        if isinstance(cause, ConfigError):
            raise cause from None
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{key} could not be built: {reason}; check the {key} config") from error


def build_partial(node: DictConfig, key: str, base: type, public: str, pop: str) -> tuple[Any, Any]:
    """``(constructor, popped)``: ``node`` without its ``pop`` entry built as a ``_partial_`` constructor of a
    ``base`` subclass (``public``: where users find ``base``), and that entry (None if absent)."""
    node = node.copy()
    with open_dict(node):
        popped = node.pop(pop, None)
    factory = build(node, key)
    cls = getattr(factory, "func", None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(
            f"{key}._target_={node.get('_target_')} is not a kd_lightning {base.__name__} built with _partial_: true; "
            f"subclass {public} and set _partial_: true"
        )
    return factory, popped


def build_group(nodes: DictConfig | None, key: str) -> list[Any]:
    """Every entry of a dict-of-configs group (``callbacks``, ``logger``), built in order."""
    return [build(node, f"{key}.{name}") for name, node in (nodes or {}).items()]


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """The ``trainer`` of ``cfg`` with the ``callbacks`` and ``logger`` groups it composes, saving
    checkpoints atomically (:class:`~kd_lightning.engine.checkpointing.AtomicCheckpointIO`) unless the
    trainer config brings its own plugins or DeepSpeed (which writes its own), and without a progress bar
    when stdout is not a terminal (unless ``trainer.enable_progress_bar`` says otherwise)."""
    callbacks = build_group(cfg.get("callbacks"), "callbacks")
    loggers = build_group(cfg.get("logger"), "logger")
    extra: dict[str, Any] = {"callbacks": callbacks, "logger": loggers}
    if "plugins" not in cfg.trainer and "deepspeed" not in str(cfg.trainer.get("strategy", "")):
        extra["plugins"] = [AtomicCheckpointIO()]
    extra |= bar_when_piped(cfg.trainer)
    return build(cfg.trainer, "trainer", **{**extra, **overrides})


def bar_when_piped(trainer_cfg: DictConfig) -> dict[str, Any]:
    """``enable_progress_bar=False`` when stdout is not a terminal and the config does not set it: a bar in
    a log file prints only at the end (:class:`~kd_lightning.callbacks.EpochLines` prints lines instead)."""
    return {} if "enable_progress_bar" in trainer_cfg or sys.stdout.isatty() else {"enable_progress_bar": False}


def log_run_config(trainer: L.Trainer, cfg: DictConfig, params: dict[str, int]) -> None:
    """Every logger of ``trainer`` gets the resolved config and the parameter counts as hyper-parameters."""
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **params})


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
