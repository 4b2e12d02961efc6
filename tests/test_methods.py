"""Methods as a config group: method=supervised end to end, and a clear error for a target that is no method."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_lightning.engine.errors import ConfigError
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config


def test_method_supervised_trains_the_student_alone_on_labelled_data(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*TINY, "method=supervised", "logger=none"])
    summary = distill(cfg)
    metrics = summary["metrics"]
    assert summary["teacher_params"] is None and summary["scratch"] is None  # no teacher, no baseline
    assert summary["config"]["data"]["transfer_samples"] == 0  # unlabelled samples left out, and recorded
    assert {"train/loss", "train/loss_ce", "val/acc", "val/acc_best", "test/acc"} <= set(metrics)
    assert not any(name.startswith("teacher/") or name == "val/agreement" for name in metrics)
    assert metrics["train/loss"] == pytest.approx(metrics["train/loss_ce"])
    assert not (tmp_path / "run" / "teacher").exists()  # no teacher was trained


def test_a_method_target_that_is_no_method_is_refused(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["method._target_=torch.nn.Linear"])
    with pytest.raises(ConfigError, match=r"^method\._target_=torch\.nn\.Linear is not a kd_lightning Method"):
        distill(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # Too few or too many models for the method.
        (["method.teachers=null"], r"DistillationModule takes at least 1 teacher\(s\) in method.teachers, got 0"),
        (["method=multi_teacher", "method.teachers=null"], "MultiTeacherDistillation takes at least 1 teacher"),
        (["method=supervised", "+method.teachers.teacher=${teacher}"], r"Supervised takes 0 teacher\(s\).*~method"),
        (["method=mutual", "method.peers=null"], "method=mutual needs at least one peer besides the student"),
        # A teacher no loss term reads would be trained for nothing.
        (["+method.teachers.teacher_1=${teacher}"], "method.teachers.teacher_1 is read by no loss term"),
        # Teachers that disagree with the data (and each other) on the number of classes.
        (
            ["method=multi_teacher", "method.teachers.teacher_1.model.num_classes=5"],
            "method.teachers.teacher_1.model outputs 5 classes but data.num_classes=10",
        ),
    ],
)
def test_a_method_given_the_wrong_models_is_refused_before_any_training(
    tmp_path: Path, kd_home: Path, overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        distill(compose_config(tmp_path / "run", [*TINY, "logger=none", *overrides]))
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "run" / "checkpoints").exists()
