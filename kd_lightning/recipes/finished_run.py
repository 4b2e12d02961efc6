"""A finished kd-distill run as kd-report and kd-export read it: its summary, resolved config and best checkpoint,
every ``_target_`` it would have them build checked against an allow-list first."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.engine.instantiate import build
from kd_lightning.engine.trusted import DEFAULT_TRUSTED, check_trusted
from kd_lightning.engine.weights import load_weights


class RunDirError(ValueError):
    """RUN_DIR is not a finished kd-distill run; the message says what is missing."""


@dataclass
class Run:
    """What kd-report needs from a finished run: its summary, resolved config and best checkpoint."""

    run_dir: Path
    summary: dict[str, Any]
    cfg: DictConfig
    checkpoint: Path

    @classmethod
    def read(cls, run_dir: Path, trusted: Sequence[str] = DEFAULT_TRUSTED) -> Run:
        """The run at ``run_dir``; every ``_target_`` its summary would have kd-report build (student,
        teachers, data) must be in ``trusted``, and the checkpoint must lie in the run's ``checkpoints/``."""
        if not run_dir.is_dir():
            raise RunDirError(f"{run_dir} is not a directory; pass the run directory kd-distill printed")
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise RunDirError(
                f"{run_dir} is not a finished kd-distill run (no summary.json); pass a run directory whose "
                "kd-distill job completed, or resume it with ckpt_path=last"
            )
        try:
            summary = json.loads(summary_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise RunDirError(f"{summary_path} is not valid JSON ({error}); the run's summary is damaged") from None
        if not isinstance(summary, dict) or "config" not in summary or "student_params" not in summary:
            raise RunDirError(f"{summary_path} is not a kd-distill summary (kd-train runs have none to report)")
        if summary.get("stages"):  # a multi-stage run (kd_lightning.recipes.stages): its student is the last stage's
            return cls.read(run_dir / "stages" / str(summary["stages"][-1]["stage"]), trusted)
        config = summary["config"]
        rebuilt = {key: config.get(key) for key in ("student", "teacher", "data")}
        rebuilt["method.teachers"] = (config.get("method") or {}).get("teachers")
        check_trusted(rebuilt, str(summary_path), trusted)
        best = Path(str(summary.get("best_checkpoint") or "last.ckpt"))
        checkpoint = run_dir / "checkpoints" / best.name  # only inside the run (which may have been moved)
        if not checkpoint.is_file():
            raise RunDirError(
                f"{run_dir} has no student checkpoint ({best.name} is missing from {run_dir / 'checkpoints'}); "
                "runs with checkpointing off (e.g. fast_dev_run) cannot be reported"
            )
        return cls(run_dir, summary, OmegaConf.create(config), checkpoint)


def load_student(run: Run) -> nn.Module:
    """The run's student with its best-checkpoint weights (as built from ``student.model``; also kd-export's)."""
    return load_weights(build(run.cfg.student.model, "student.model"), run.checkpoint, key="best checkpoint")
