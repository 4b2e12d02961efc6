"""What ``kd-distill`` does for a multi-stage method (``method=born_again``, ``method=assistant_chain``).

Each stage is a whole single-stage run (:func:`kd_lightning.recipes.distill.distill`) in
``<run dir>/stages/<stage>``, with its own checkpoints and summary; a stage's teachers are the best
checkpoints of the stages it names, its student starts from the ``last.ckpt`` of the stage named by
``Stage.student_from`` (when set: ``student.checkpoint``), and ``Stage.overrides`` change its config alone.
Resuming the run (``ckpt_path=last`` or ``auto``) keeps every finished stage as it is and resumes the
interrupted one from its ``last.ckpt``. The run's summary is the last
stage's (the student's), with a row per stage and, where the method asks, the ensemble of the stages.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build
from kd_lightning.engine.run_dir import announce, check_run_dir, finished_summary
from kd_lightning.engine.weights import load_weights
from kd_lightning.methods.classifier import unpack
from kd_lightning.methods.stages import MultiStageMethod, Stage
from kd_lightning.reporting.summary import Summary


def multi_stage_method(cfg: DictConfig) -> MultiStageMethod | None:
    """The configured method if it is multi-stage (built), else None."""
    target = cfg.method.get("_target_")
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except (ImportError, AttributeError, ValueError):
        return None  # the single-stage recipe reports a bad _target_
    if not (isinstance(cls, type) and issubclass(cls, MultiStageMethod)):
        return None
    return build(cfg.method, "method")


def stage_ckpt_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """What each stage resumes with: null (a fresh run; the run dir must not hold stages) or ``auto``."""
    if cfg.ckpt_path is None:
        check_run_dir(out_dir, resuming=False)
        return None
    if cfg.ckpt_path not in ("last", "auto"):
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: a multi-stage run resumes as a whole; use ckpt_path=last (or auto) with "
            "hydra.run.dir=<the run>, and each stage resumes from its own last.ckpt"
        )
    if cfg.ckpt_path == "last" and not (out_dir / "stages").is_dir():
        raise ConfigError(
            f"ckpt_path=last: {out_dir} holds no stages to resume; set hydra.run.dir to the multi-stage run "
            "(ckpt_path=auto starts fresh if none)"
        )
    return "auto"


def stage_config(cfg: DictConfig, stage: Stage, out_dir: Path, ckpt_path: str | None, last: bool) -> DictConfig:
    """The single-stage run config of ``stage``: the run's config with the stage's method and student, its
    own run directory; only the last stage compares with the scratch student and answers optimized_metric."""
    stage_cfg = copy.deepcopy(cfg)
    with open_dict(stage_cfg):
        stage_cfg.method = stage.method
        stage_cfg.student.model = stage.student
        stage_cfg.paths.output_dir = str(out_dir / "stages" / stage.name)
        stage_cfg.ckpt_path = ckpt_path
        stage_cfg.task_name = f"{cfg.task_name}/{stage.name}"
        stage_cfg.compare_scratch = bool(cfg.compare_scratch) and last
        if not last:
            stage_cfg.optimized_metric = "val/acc_best"
        for key, value in stage.overrides.items():
            OmegaConf.update(stage_cfg, key, value, merge=False)
    return stage_cfg


def with_teacher_checkpoints(stage_cfg: DictConfig, stage: Stage, summaries: dict[str, dict[str, Any]]) -> None:
    """Point the stage's teachers at the best checkpoints of the stages they come from."""
    for teacher, source in stage.teachers_from.items():
        checkpoint = summaries[source].get("best_checkpoint")
        if not checkpoint or not Path(checkpoint).is_file():
            raise ConfigError(
                f"stage {stage.name} distils from stage {source}, whose best checkpoint ({checkpoint or 'none'}) "
                f"is missing: checkpointing must stay on (callbacks.model_checkpoint); rerun without "
                f"{Path(stage_cfg.paths.output_dir).parent / source} to train that stage again"
            )
        with open_dict(stage_cfg):
            stage_cfg.method.teachers[teacher].checkpoint = checkpoint


def with_student_checkpoint(stage_cfg: DictConfig, stage: Stage, summaries: dict[str, dict[str, Any]]) -> None:
    """Start the stage's student from the final weights (``last.ckpt``, beside the best checkpoint) of the stage
    named by ``student_from``: ``student.checkpoint``, which the single-stage recipe loads into the student."""
    if stage.student_from is None:
        return
    best = summaries[stage.student_from].get("best_checkpoint")
    last = Path(best).with_name("last.ckpt") if best else None
    if last is None or not last.is_file():
        raise ConfigError(
            f"stage {stage.name} starts from the student of stage {stage.student_from}, whose last checkpoint "
            f"({last or 'none'}) is missing: checkpointing must stay on (callbacks.model_checkpoint.save_last=true); "
            f"rerun without {Path(stage_cfg.paths.output_dir).parent / stage.student_from} to train that stage again"
        )
    with open_dict(stage_cfg):
        stage_cfg.student.checkpoint = str(last)


@torch.no_grad()
def ensemble_accuracy(cfg: DictConfig, stages: list[Stage], summaries: dict[str, dict[str, Any]]) -> float:
    """Test accuracy of ``1/S sum_s softmax(z_s)`` over the stages' best checkpoints."""
    models = []
    for stage in stages:
        model = build(stage.student, f"{stage.name} model")
        load_weights(model, summaries[stage.name]["best_checkpoint"], key=f"stage {stage.name}")
        models.append(model.eval())
    datamodule = build(cfg.data, "data")
    datamodule.prepare_data()
    datamodule.setup("test")
    correct = total = 0
    for batch in datamodule.test_dataloader():
        x, y, _ = unpack(batch)
        probs = torch.stack([model(x).softmax(-1) for model in models]).mean(0)
        correct += int((probs.argmax(-1) == y).sum())
        total += int(y.numel())
    return correct / total


def stage_row(stage: Stage, summary: dict[str, Any]) -> dict[str, Any]:
    metrics = summary["metrics"]
    teachers = ", ".join(f"{teacher} <- {source}" for teacher, source in stage.teachers_from.items())
    return {
        "stage": stage.name,
        "model": str(stage.student.get("_target_", "")),
        "params": summary["student_params"],
        "method": str(stage.method.get("_target_", "")).rsplit(".", 1)[-1],
        "teacher": teachers or summary.get("teacher_source") or "none",
        "test_acc": metrics.get("test/acc"),
        "test_acc_last": metrics.get("test/acc_last"),
        "val_acc_best": metrics.get("val/acc_best"),
        "seconds": summary["seconds"].get("total"),
    }


def distill_stages(
    cfg: DictConfig,
    method: MultiStageMethod,
    run_stage: Callable[[DictConfig], dict[str, Any]],
    check_stage: Callable[[DictConfig], Any],
) -> dict[str, Any]:
    """Check every stage's config with ``check_stage`` (bad input in the last stage fails before the first
    trains), then run each in order with ``run_stage`` (the single-stage recipe) and summarise them (see
    the module docstring)."""
    start = time.perf_counter()
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = stage_ckpt_path(cfg, out_dir)
    if ckpt_path is not None and (finished := finished_summary(out_dir, cfg.trainer)) is not None:
        announce(f"{out_dir} already finished (summary.json): nothing to resume, its results are kept")
        return finished
    announce(f"run directory: {out_dir} ({type(method).__name__}, one run per stage in stages/)")
    stages = method.stages(cfg)
    names = [stage.name for stage in stages]
    if len(set(names)) < len(names):
        raise ConfigError(f"stage names must differ, got {names}: rename the method's models (e.g. method.assistants)")
    for index, stage in enumerate(stages):
        try:
            check_stage(stage_config(cfg, stage, out_dir, ckpt_path, last=index == len(stages) - 1))
        except ConfigError as error:
            raise ConfigError(f"stage {stage.name} of method={type(method).__name__}: {error}") from None
    summaries: dict[str, dict[str, Any]] = {}
    for index, stage in enumerate(stages):
        stage_cfg = stage_config(cfg, stage, out_dir, ckpt_path, last=index == len(stages) - 1)
        with_teacher_checkpoints(stage_cfg, stage, summaries)
        with_student_checkpoint(stage_cfg, stage, summaries)
        announce(f"stage {index + 1}/{len(stages)}: {stage.name}")
        summaries[stage.name] = run_stage(stage_cfg)
    final = summaries[stages[-1].name]
    metrics = dict(final["metrics"])
    if method.ensemble:
        metrics["test/acc_ensemble"] = ensemble_accuracy(cfg, stages, summaries)
    summary = Summary(
        metrics=metrics,
        student_params=final["student_params"],
        teacher_params=final.get("teacher_params"),
        adapter_params=final.get("adapter_params", 0),
        teacher_source=final.get("teacher_source"),
        scratch=final.get("scratch"),
        seconds={
            **{f"stage {stage.name}": summaries[stage.name]["seconds"]["total"] for stage in stages},
            "total": time.perf_counter() - start,
        },
        best_checkpoint=final.get("best_checkpoint", ""),
        config=OmegaConf.to_container(cfg, resolve=True),
        stages=[stage_row(stage, summaries[stage.name]) for stage in stages],
    )
    if rank_zero_only.rank == 0:  # strategy=ddp runs this whole function once per process
        summary.write(out_dir)
        summary.print()
    announce(f"results: {out_dir} (summary.json, summary.md, stages/<stage>/); report: kd-report {out_dir}")
    return summary.as_dict()
