"""Every registered loss trains a couple of steps end to end from its conf/loss/<name>.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.utils import instantiate

from kd_lightning.errors import ConfigError
from kd_lightning.losses import TERMS
from kd_lightning.runner import distill
from tests.conftest import TINY, compose_config

#: Losses on conv feature maps need a conv student; the rest run with the default MLP student.
CONV_STUDENT = {"fitnet", "at", "vid"}
OVERRIDES = [*TINY, "+trainer.fast_dev_run=2", "logger=none", "compare_scratch=false"]


@pytest.mark.parametrize("name", sorted(TERMS))
def test_loss_config_trains(name: str, tmp_path: Path, kd_home: Path) -> None:
    student = "cnn1d_narrow" if name in CONV_STUDENT else "mlp"
    cfg = compose_config(tmp_path / "run", [*OVERRIDES, f"loss={name}", f"student={student}"])
    metrics = distill(cfg)["metrics"]
    assert math.isfinite(metrics[f"train/loss_{name}"]) and 0.0 <= metrics["test/acc"] <= 1.0


def test_feature_loss_with_the_wrong_student_fails_naming_the_key(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*OVERRIDES, "loss=fitnet", "student=mlp"])
    with pytest.raises(ConfigError, match=r"^loss\.terms\.fitnet\.student_layer='features\.3'"):
        distill(cfg)


def test_unbridgeable_layers_fail_at_setup_naming_the_loss_key(tmp_path: Path, kd_home: Path) -> None:
    overrides = [*OVERRIDES, "loss=at", "student=mlp", "loss.terms.at.student_layer=body.3"]
    with pytest.raises(ConfigError, match=r"^loss\.terms\.at: attention transfer needs conv maps"):
        distill(compose_config(tmp_path / "run", overrides))


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_logit_standardization_is_a_config_switch(name: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [f"loss={name}", f"loss.terms.{name}.standardize=true", "loss.temperature=2"])
    term = instantiate(cfg.loss).terms[name]
    assert term.standardize and term.temperature == 2.0
