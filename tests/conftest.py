"""Shared fixtures: an isolated KD_LIGHTNING_HOME, Hydra composition and tiny budgets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.cli.common import CONFIG_DIR

#: Overrides that make a default run take seconds: few epochs, a small transfer set, no bars.
TINY = [
    "trainer.max_epochs=2",
    "teacher.fit.max_epochs=2",
    "data.transfer_samples=1000",
    "+trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]

#: Overrides for each job of a multirun test: one epoch, no logger, no scratch baseline.
SWEEP_JOB = [
    "trainer.max_epochs=1",
    "teacher.fit.max_epochs=1",
    "data.transfer_samples=500",
    "compare_scratch=false",
    "logger=none",
    "+trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="session")
def kd_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One KD_LIGHTNING_HOME for the session, so generated data and teachers are reused."""
    home = tmp_path_factory.mktemp("kd_home")
    previous = os.environ.get("KD_LIGHTNING_HOME")
    os.environ["KD_LIGHTNING_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("KD_LIGHTNING_HOME")
    else:
        os.environ["KD_LIGHTNING_HOME"] = previous


#: What tests' Trainers leave out unless they ask for it: the CPU, no logger, checkpoints, bar or model summary.
TINY_TRAINER = {
    "accelerator": "cpu",
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}


def tiny_trainer(**options: Any) -> Any:
    """A Lightning Trainer for tests: :data:`TINY_TRAINER` updated by ``options``."""
    import lightning as L

    return L.Trainer(**{**TINY_TRAINER, **options})


def compose_config(output_dir: Path, overrides: list[str] = (), config_name: str = "distill") -> DictConfig:
    """Compose a config as the CLI would, with the run directory set to ``output_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def model_target(group: str, option: str) -> str | None:
    """The ``model._target_`` that option ``option`` of ``group`` (teacher / student, or ``model`` itself) gets,
    read from the YAML files without composing: its own, else that of what its ``defaults`` pull in first (a
    ``/model@model: <name>`` entry: conf/model/<name>.yaml; a plain ``- <name>``: an option it extends)."""
    config = OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
    own = OmegaConf.select(config, "_target_" if group == "model" else "model._target_")
    if own is not None:
        return own
    for entry in config.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and (found := model_target(group, entry)):
            return found
        if isinstance(entry, DictConfig) and "/model@model" in entry:
            return model_target("model", entry["/model@model"])
    return None


def example_for(model_cfg: Any) -> Any:
    """An input batch of two of the kind the configured model reads: 32x32 RGB images for the CIFAR zoo and the
    image models of timm / torchvision / Hugging Face, token ids for a Hugging Face text model, else MNIST-1D
    signals (B, 1, 40)."""
    target = model_cfg._target_
    images = ("timm_model", "torchvision_model", "hf_image_classifier", "HFClassifier")  # HFClassifier: deit_tiny
    if target.startswith("kd_lightning.models.cifar.") or target.rsplit(".", 1)[-1] in images:
        return torch.randn(2, 3, 32, 32)
    if target.endswith("hf_sequence_classifier"):
        return {"input_ids": torch.randint(0, 100, (2, 7)), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    return torch.randn(2, 1, 40)
