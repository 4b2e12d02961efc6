"""Shared plumbing of the console entry points: where the configs are, one-line errors, the sweep value."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.multirun import in_multirun
from kd_lightning.engine.quiet import quiet_third_party
from kd_lightning.engine.resolvers import register_resolvers

_PACKAGE = Path(__file__).resolve().parent.parent


def config_dir() -> str:
    """The Hydra config tree: ``kd_lightning/conf`` in an installed wheel, else ``conf/`` of the source tree
    (a checkout or an editable install)."""
    shipped = _PACKAGE / "conf"
    return str(shipped if (shipped / "distill.yaml").is_file() else _PACKAGE.parent / "conf")


#: The Hydra config tree the entry points compose from.
CONFIG_DIR = config_dir()

log = logging.getLogger("kd_lightning")

#: Exit status of a run stopped by SIGTERM (128 + 15, as a shell reports it), so requeue-on-failure fires.
INTERRUPTED = 143


def lightning_console_logging() -> None:
    """Lightning's subpackages log to a plain stderr handler of their own, not propagated, when they are
    imported before logging is configured; the entry points import Lightning only once a run starts,
    after Hydra has configured the root logger, which would send each of its lines to Lightning's
    ``INFO:`` handler and to Hydra's console as well. Set them up as an import at start-up would have
    (nothing is changed once the root logger has handlers, e.g. in a process that configured logging)."""
    if logging.getLogger().hasHandlers():
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        logger.addHandler(logging.StreamHandler())
        logger.propagate = False


register_resolvers()  # before @hydra.main composes any config
quiet_third_party()
lightning_console_logging()


def exit_on_config_error(job: Callable[[DictConfig], Any], cfg: DictConfig, program: str) -> Any:
    """Run ``job(cfg)``; a :class:`ConfigError` ends a single run with one line and exit code 2, a SIGTERM
    (preemption, a SLURM time limit) with one line and exit code 143 (:data:`INTERRUPTED`).

    In a multirun the error is logged and re-raised instead, so Hydra records this job as failed
    and still runs the others (it reports the failure after the batch).
    """
    try:
        return job(cfg)
    except SystemExit as stop:  # Lightning ends a fit on SIGTERM with a SystemExit that would exit 0
        from lightning.pytorch.utilities.exceptions import SIGTERMException  # imported by the run already

        if not isinstance(stop, SIGTERMException):
            if stop.code == 2 and not in_multirun():  # a one-line error printed where found (an unusable home)
                remove_empty_run_dir(cfg)
            raise
        print(
            f"{program}: interrupted by SIGTERM before the run finished (no summary written); its last checkpoint "
            "resumes it: the same command with ckpt_path=auto",
            file=sys.stderr,
        )
        raise SystemExit(INTERRUPTED) from None
    except ConfigError as error:
        if in_multirun():  # Hydra reports the failed job; its log keeps the line
            log.error("%s", error)
            raise
        print(f"{program}: error: {error}", file=sys.stderr)  # once: not also through the console logger
        remove_empty_run_dir(cfg)
        raise SystemExit(2) from None


def remove_empty_run_dir(cfg: DictConfig) -> None:
    """After a failed start: remove the run directory Hydra made for this run when it holds nothing but Hydra's
    own ``.hydra`` files and the log, and, in the default layout (``<log_dir>/<task_name>/<date>/<time>``), the
    date and task folders if that leaves them empty. A directory holding anything else (checkpoints, a
    summary, a user's file) is kept as it is. Nothing of ``cfg`` is resolved (``paths`` may be what failed)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not run_dir.is_dir():
        return
    if any(p.name != ".hydra" and not (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir()):
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    date, task = run_dir.parent, run_dir.parent.parent
    if task.name == str(cfg.get("task_name")) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date.name):
        for folder in (date, task):
            try:
                folder.rmdir()  # only an empty one: another run's folder in it keeps it
            except OSError:
                return


def run_for_sweeper(job: Callable[[DictConfig], Mapping[str, Any]], cfg: DictConfig, program: str) -> float:
    """Run a training job (one-line config errors) and return its ``optimized_metric`` for sweepers."""
    metrics = exit_on_config_error(job, cfg, program)["metrics"]
    if cfg.optimized_metric not in metrics:
        raise ConfigError(f"optimized_metric={cfg.optimized_metric} was not logged; pick one of {sorted(metrics)}")
    return metrics[cfg.optimized_metric]
