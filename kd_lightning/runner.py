"""What ``kd-distill`` and ``kd-train`` do, top to bottom, from a composed Hydra config.

kd-distill: seed -> data -> teacher (checkpoint, cache, or train-and-cache) -> student + loss ->
fit -> test (best checkpoint) -> scratch-student baseline (cache or train-and-cache) -> summary.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from torch import nn

from kd_lightning.cache import cache_key, data_identity, read_json, trainer_identity, write_json_atomic
from kd_lightning.errors import ConfigError
from kd_lightning.losses import DistillationLoss
from kd_lightning.module import DistillationModule
from kd_lightning.runtime import Runtime
from kd_lightning.summary import Summary
from kd_lightning.teacher import load_weights
from kd_lightning.tracking import finish_runs

log = logging.getLogger(__name__)


def build(node: DictConfig, key: str, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces a :class:`ConfigError` raised inside as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause: BaseException = error
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise ConfigError(f"{key} could not be built: {reason}; check the {key} config") from error


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def labelled_only(data_cfg: DictConfig) -> dict[str, int]:
    """Instantiate-overrides that drop an unlabelled transfer set (useless without a teacher)."""
    return {"transfer_samples": 0} if "transfer_samples" in data_cfg else {}


def sync_csv_columns(trainer: L.Trainer) -> None:
    """Before another ``trainer.test`` / ``validate`` after a ``ddp_spawn`` fit: the fit's CSV rows were
    written by child processes, so this process's CSV writer does not know the file's columns, and
    Lightning's header rewrite for new columns would fail ("dict contains fields not in fieldnames")."""
    for logger in trainer.loggers if trainer.is_global_zero else []:  # other ranks write no CSV
        if isinstance(logger, CSVLogger) and Path(logger.experiment.metrics_file_path).is_file():
            with open(logger.experiment.metrics_file_path, newline="") as file:
                header = next(csv.reader(file), [])
            logger.experiment.metrics_keys = sorted(set(logger.experiment.metrics_keys) | set(header))


def run_test(
    trainer: L.Trainer, module: L.LightningModule, datamodule: L.LightningDataModule, ckpt_path: str | None = None
) -> dict[str, float]:
    """``trainer.test`` (weights of ``ckpt_path``, else as they are) -> metrics as floats."""
    sync_csv_columns(trainer)
    metrics = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)[0]
    return {name: float(value) for name, value in metrics.items()}


# ------------------------------------------------------------------------------ supervised fits
@dataclass
class FitResult:
    """Outcome of one supervised fit: metrics of the best-validation checkpoint."""

    val_acc_best: float
    test_acc: float
    seconds: float
    best_checkpoint: str | None


def fit_supervised(
    cfg: DictConfig,
    model: nn.Module,
    out_dir: Path,
    max_epochs: int,
    optimizer_cfg: DictConfig,
    scheduler_cfg: DictConfig | None,
    label_smoothing: float = 0.0,
    trainer_cfg: DictConfig | None = None,
) -> FitResult:
    """Train ``model`` with cross-entropy only on the labelled data of ``cfg.data``."""
    datamodule = build(cfg.data, "data", **labelled_only(cfg.data))
    module = DistillationModule(
        student=model,
        loss=DistillationLoss(alpha=0.0, label_smoothing=label_smoothing),
        optimizer=build(optimizer_cfg, "optimizer"),
        scheduler=build(scheduler_cfg, "scheduler") if scheduler_cfg else None,
        num_classes=cfg.data.num_classes,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="epoch_{epoch:03d}",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer = build(
        trainer_cfg if trainer_cfg is not None else cfg.trainer,
        "trainer",
        max_epochs=max_epochs,
        default_root_dir=str(out_dir),
        callbacks=[checkpoint],
        logger=CSVLogger(str(out_dir), name="csv"),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    val_best = float(trainer.callback_metrics["val/acc_best"])  # valid under ddp_spawn too
    best = checkpoint.best_model_path or None  # None when checkpointing is off (e.g. fast_dev_run)
    test_metrics = run_test(trainer, module, datamodule, ckpt_path=best)
    return FitResult(val_best, test_metrics["test/acc"], seconds, best)


def train_teacher(cfg: DictConfig, model: nn.Module, out_dir: Path) -> FitResult:
    """Train the teacher ``model`` supervised with the ``cfg.teacher.fit`` recipe; loads its best weights."""
    fit = cfg.teacher.fit
    result = fit_supervised(cfg, model, out_dir, fit.max_epochs, fit.optimizer, fit.get("scheduler"))
    if result.best_checkpoint:
        load_weights(model, result.best_checkpoint, key="teacher.checkpoint")
    return result


@dataclass
class TeacherInfo:
    model: nn.Module
    source: str
    fit_seconds: float = 0.0


def obtain_teacher(cfg: DictConfig, model: nn.Module, out_dir: Path) -> TeacherInfo:
    """Weights for the teacher ``model``: ``teacher.checkpoint``; else, without a ``teacher.fit`` recipe,
    the weights its ``_target_`` built (a pretrained factory); else the cache; else trained and cached."""
    if cfg.teacher.checkpoint:
        return TeacherInfo(load_weights(model, cfg.teacher.checkpoint), f"checkpoint {cfg.teacher.checkpoint}")
    if not cfg.teacher.get("fit"):
        return TeacherInfo(model, f"as built by {cfg.teacher.model._target_}")
    key = cache_key(
        model=cfg.teacher.model,
        fit=cfg.teacher.fit,
        data=data_identity(cfg.data),
        trainer=trainer_identity(cfg.trainer),
        seed=cfg.seed,
    )
    entry = Path(cfg.paths.cache_dir) / "teachers" / key
    weights = entry / "model.safetensors"
    if weights.is_file():
        log.info("Reusing cached teacher %s", weights)
        return TeacherInfo(load_weights(model, weights, key="teacher cache"), f"cache {weights}")
    log.info("No teacher.checkpoint and none cached: training the teacher (%s epochs)", cfg.teacher.fit.max_epochs)
    L.seed_everything(cfg.seed, workers=True)
    result = train_teacher(cfg, model, out_dir / "teacher")
    entry.mkdir(parents=True, exist_ok=True)
    tmp = entry / f".model.{time.time_ns()}.safetensors"
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    meta = {
        "val_acc_best": result.val_acc_best,
        "test_acc": result.test_acc,
        "fit_seconds": result.seconds,
        "config": OmegaConf.to_container(cfg.teacher, resolve=True),
    }
    write_json_atomic(entry / "meta.json", meta)
    return TeacherInfo(model, f"trained, cached at {weights}", result.seconds)


def scratch_baseline(cfg: DictConfig, out_dir: Path) -> dict[str, float]:
    """The same student, data (labelled only), budget and seed with alpha = 0; cached."""
    key = cache_key(
        model=cfg.student.model,
        data=data_identity(cfg.data),
        optimizer=cfg.optimizer,
        scheduler=cfg.scheduler,
        epochs=cfg.trainer.max_epochs,
        trainer=trainer_identity(cfg.trainer),
        label_smoothing=cfg.loss.label_smoothing,
        seed=cfg.seed,
    )
    path = Path(cfg.paths.cache_dir) / "scratch" / f"{key}.json"
    cached = read_json(path)
    if cached is not None:
        return cached
    L.seed_everything(cfg.seed, workers=True)
    result = fit_supervised(
        cfg,
        build(cfg.student.model, "student.model"),
        out_dir / "scratch",
        cfg.trainer.max_epochs,
        cfg.optimizer,
        cfg.scheduler or None,
        label_smoothing=cfg.loss.label_smoothing,
    )
    record = {"val_acc_best": result.val_acc_best, "test_acc": result.test_acc, "fit_seconds": result.seconds}
    write_json_atomic(path, record)
    return record


# ------------------------------------------------------------------------------------ checks
def resolve_ckpt_path(ckpt_path: str | None, out_dir: Path) -> str | None:
    """``ckpt_path``: null (fresh run), a checkpoint path, ``last`` (this run dir's ``last.ckpt``, which
    must exist) or ``auto`` (``last.ckpt`` if this run dir has one, else a fresh run: what a requeued
    SLURM job wants)."""
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
    taken = [p for p in (out_dir / "checkpoints", out_dir / "summary.json") if p.exists()]
    if taken and not resuming:
        raise ConfigError(
            f"hydra.run.dir={out_dir} already holds a run ({taken[0].name}); pick a new "
            "hydra.run.dir or resume it with ckpt_path=<its checkpoint>"
        )


def check_class_counts(example: torch.Tensor, num_classes: int, **models: nn.Module) -> None:
    """Run one example batch through each model and compare its logits to ``data.num_classes``."""
    for name, model in models.items():
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(example)
        model.train(was_training)
        if out.shape[-1] != num_classes:
            raise ConfigError(
                f"{name}.model outputs {out.shape[-1]} classes but data.num_classes={num_classes}; "
                f"set {name}.model.num_classes={num_classes} (or pick matching data)"
            )


def start_run(cfg: DictConfig) -> tuple[Path, str | None]:
    """The run directory and the checkpoint to resume (``ckpt_path``), checked; seeds everything."""
    out_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, out_dir)
    check_run_dir(out_dir, resuming=ckpt_path is not None)
    L.seed_everything(cfg.seed, workers=True)
    return out_dir, ckpt_path


# ---------------------------------------------------------------------------------- kd-distill
def distill(cfg: DictConfig) -> dict[str, Any]:
    """Run a full distillation job; returns the summary (metrics included)."""
    start = time.perf_counter()
    out_dir, ckpt_path = start_run(cfg)

    loss: DistillationLoss = build(cfg.loss, "loss")
    overrides = labelled_only(cfg.data) if loss.alpha == 0 else {}
    if cfg.data.get("transfer_samples") and overrides:
        log.info("loss.alpha=0: the unlabelled transfer set is left out (only distillation uses it)")
    runtime: Runtime = build(cfg.runtime, "runtime")
    if runtime.cpu_threads:
        torch.set_num_threads(runtime.cpu_threads)
    needs_index = loss.uses_index or runtime.teacher_cache is not None
    if loss.alpha > 0 and needs_index and "return_index" in cfg.data and not cfg.data.return_index:
        log.info("the loss or runtime.teacher_cache needs dataset sample indices: data.return_index set to true")
        overrides["return_index"] = True
    with open_dict(cfg):  # recorded in the summary's config as run
        cfg.data.update(overrides)
    datamodule = build(cfg.data, "data")
    models = {"student": build(cfg.student.model, "student.model")}
    if loss.alpha > 0:
        models["teacher"] = build(cfg.teacher.model, "teacher.model")
    check_class_counts(datamodule.example_input(), cfg.data.num_classes, **models)
    student = models["student"]
    teacher = obtain_teacher(cfg, models["teacher"], out_dir) if loss.alpha > 0 else None

    L.seed_everything(cfg.seed, workers=True)
    module = DistillationModule(
        student=student,
        loss=loss,
        optimizer=build(cfg.optimizer, "optimizer"),
        scheduler=build(cfg.scheduler, "scheduler") if cfg.scheduler else None,
        num_classes=cfg.data.num_classes,
        teacher=teacher.model if teacher else None,
        save_teacher=cfg.save_teacher,
        scale_lr_with_world_size=cfg.scale_lr_with_world_size,
        runtime=runtime,
    )
    # Sizes loss adapters (and per-sample memories) now, so they are counted below.
    module.setup_for(datamodule.example_input(), getattr(datamodule, "num_train_samples", None))
    callbacks = [build(node, f"callbacks.{name}") for name, node in (cfg.callbacks or {}).items()]
    loggers = [build(node, f"logger.{name}") for name, node in (cfg.logger or {}).items()]
    trainer: L.Trainer = build(cfg.trainer, "trainer", callbacks=callbacks, logger=loggers)
    params = {"params/student": parameter_count(student)}
    if parameter_count(loss):
        params["params/adapters"] = parameter_count(loss)
    if teacher:
        params["params/teacher"] = parameter_count(teacher.model)
    for logger in trainer.loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), **params})

    distill_start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    distill_seconds = time.perf_counter() - distill_start
    metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    last_epoch = run_test(trainer, module, datamodule)
    metrics.update({f"{name}_last": value for name, value in last_epoch.items() if name.startswith("test/")})
    metrics.update(run_test(trainer, module, datamodule, ckpt_path=best or None))

    scratch = scratch_baseline(cfg, out_dir) if cfg.compare_scratch and teacher else None
    summary = Summary(
        metrics=metrics,
        student_params=params["params/student"],
        teacher_params=params.get("params/teacher"),
        adapter_params=params.get("params/adapters", 0),
        teacher_source=teacher.source if teacher else None,
        scratch=scratch,
        seconds={
            "teacher_fit": teacher.fit_seconds if teacher else 0.0,
            "distill": distill_seconds,
            "total": time.perf_counter() - start,
        },
        best_checkpoint=best,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    finish_runs(trainer.loggers, summary.as_dict())
    if trainer.is_global_zero:  # strategy=ddp runs this whole function once per process
        summary.write(out_dir)
        summary.print()
    return summary.as_dict()
