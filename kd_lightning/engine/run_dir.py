"""The run directory: which checkpoint a run resumes, and never two runs in one directory."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from kd_lightning.engine.errors import ConfigError, check_type

log = logging.getLogger(__name__)


def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``ckpt_path``: null (fresh run), a checkpoint path, ``last`` (this run dir's ``last.ckpt``, which
    must exist) or ``auto`` (``last.ckpt`` if this run dir has one, else a fresh run: what a requeued
    SLURM job wants)."""
    check_type(ckpt_path, (str, type(None)), "ckpt_path")
    if ckpt_path is None:
        return None
    last = out_dir / "checkpoints" / "last.ckpt"
    if ckpt_path == "auto":
        return str(last) if last.is_file() else None
    path = last if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            f"ckpt_path={ckpt_path}: {path} does not exist; point ckpt_path at a checkpoint, or set "
            "hydra.run.dir to the run to resume with ckpt_path=last (ckpt_path=auto starts fresh if none)"
        )
    return str(path)


def check_run_dir(out_dir: Path, resuming: bool) -> None:
    """Refuse to write into a directory that already holds another run's results."""
    taken = [p for p in (out_dir / "checkpoints", out_dir / "stages", out_dir / "summary.json") if p.exists()]
    if taken and not resuming:
        raise ConfigError(
            f"hydra.run.dir={out_dir} already holds a run ({taken[0].name}); pick a new "
            "hydra.run.dir or resume it with ckpt_path=<its checkpoint>"
        )


@rank_zero_only
def announce(line: str) -> None:
    """A line the user needs wherever the output goes (where the run is, where its results are): printed
    on global rank 0, flushed at once."""
    print(f"kd_lightning: {line}", flush=True)


@dataclass
class RunStart:
    """Where a run writes, the checkpoint it resumes, and, for a run that already finished (a requeued
    job resuming it), its summary: the recipe then returns that and touches nothing."""

    out_dir: Path
    ckpt_path: str | None
    finished: dict[str, Any] | None = None


def finished_summary(out_dir: Path, trainer_cfg: DictConfig) -> dict[str, Any] | None:
    """The summary of a run in ``out_dir`` that finished the budget ``trainer_cfg`` asks for (``summary.json``
    is written last, atomically); None when there is none, or the budget grew (the resumed run extends it)."""
    path = out_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None
    ran = (summary.get("config") or {}).get("trainer") or {}
    budget = ("max_epochs", "max_steps")
    grew = any((trainer_cfg.get(key) or -1) > (ran.get(key) or -1) for key in budget)
    return None if grew else summary


def start_run(cfg: DictConfig) -> RunStart:
    """The run directory (announced) and the checkpoint to resume (``ckpt_path``), checked; seeds everything."""
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    check_run_dir(out_dir, resuming=ckpt_path is not None)
    L.seed_everything(cfg.seed, workers=True)
    finished = finished_summary(out_dir, cfg.trainer) if ckpt_path is not None else None
    if finished is not None:
        announce(f"{out_dir} already finished (summary.json): nothing to resume, its results are kept")
    else:
        announce(f"run directory: {out_dir}")
    return RunStart(out_dir, ckpt_path, finished)
