"""Supervised fits (teachers, scratch baselines) and the test passes every recipe runs."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_lightning.callbacks.checkpoint import ModelCheckpoint
from kd_lightning.callbacks.progress import EpochLines
from kd_lightning.engine.instantiate import bar_when_piped, build
from kd_lightning.methods.supervised import Supervised


def labelled_only(data_cfg: DictConfig) -> dict[str, int]:
    """Instantiate-overrides that drop an unlabelled transfer set (for methods that cannot use it)."""
    return {"transfer_samples": 0} if "transfer_samples" in data_cfg else {}


def supervised_data(data_cfg: DictConfig) -> dict[str, Any]:
    """Instantiate-overrides for supervised fits (teachers, scratch baselines): the labelled samples only,
    without ``data.augment`` (a distillation view; its mixup keeps only one sample's label)."""
    return labelled_only(data_cfg) | ({"augment": None} if "augment" in data_cfg else {})


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


def progress_interval(cfg: DictConfig) -> float:
    """Seconds between in-epoch progress lines of a recipe's own fits (teacher, scratch): the run's
    ``callbacks.epoch_lines.interval_s`` (30 when the run has none)."""
    return float(OmegaConf.select(cfg, "callbacks.epoch_lines.interval_s", default=30.0))


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
    """Train ``model`` with cross-entropy only (:class:`~kd_lightning.methods.Supervised`) on the labelled,
    un-augmented data of ``cfg.data`` (:func:`supervised_data`); test its best-validation checkpoint."""
    datamodule = build(cfg.data, "data", **supervised_data(cfg.data))
    module = Supervised(
        student=model,
        num_classes=cfg.data.num_classes,
        optimizer=build(optimizer_cfg, "optimizer"),
        scheduler=build(scheduler_cfg, "scheduler") if scheduler_cfg else None,
        label_smoothing=label_smoothing,
    )
    checkpoint = ModelCheckpoint(
        dirpath=out_dir / "checkpoints",
        filename="epoch_{epoch:03d}",
        monitor="val/acc",
        mode="max",
        save_last=True,
        auto_insert_metric_name=False,
    )
    trainer_cfg = trainer_cfg if trainer_cfg is not None else cfg.trainer
    trainer = build(
        trainer_cfg,
        "trainer",
        max_epochs=max_epochs,
        default_root_dir=str(out_dir),
        callbacks=[checkpoint, EpochLines(out_dir.name, progress_interval(cfg))],
        logger=CSVLogger(str(out_dir), name="csv"),
        **bar_when_piped(trainer_cfg),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    val_best = float(trainer.callback_metrics["val/acc_best"])  # valid under ddp_spawn too
    best = checkpoint.best_model_path or None  # None when checkpointing is off (e.g. fast_dev_run)
    test_metrics = run_test(trainer, module, datamodule, ckpt_path=best)
    return FitResult(val_best, test_metrics["test/acc"], seconds, best)
