"""Shared plumbing of the console entry points: one-line errors for bad configuration."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kd_lightning.errors import ConfigError
from kd_lightning.resolvers import register_resolvers

T = TypeVar("T")

#: The Hydra config tree (``conf/`` at the repository root).
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

log = logging.getLogger("kd_lightning")

register_resolvers()  # before @hydra.main composes any config


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_config_error(job: Callable[[DictConfig], T], cfg: DictConfig, program: str) -> T:
    """Run ``job(cfg)``; a :class:`ConfigError` ends a single run with one line and exit code 2.

    In a multirun the error is logged and re-raised instead, so Hydra records this job as failed
    and still runs the others (it reports the failure after the batch).
    """
    try:
        return job(cfg)
    except ConfigError as error:
        log.error("%s", error)
        if in_multirun():
            raise
        print(f"{program}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
