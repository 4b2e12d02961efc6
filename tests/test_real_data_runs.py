"""kd-distill on real on-disk formats with models from the zoo and from Hugging Face, configured from YAML only:
CIFAR-100 pickles with the CIFAR zoo, Hugging Face image classifiers with feature taps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build
from kd_lightning.recipes.distill import distill
from tests.conftest import compose_config
from tests.image_fixtures import write_cifar100
from tests.test_cli import run

QUIET = ["logger=none", "+trainer.enable_progress_bar=false", "compare_scratch=false"]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cifar_runs")
    write_cifar100(root, train=160, test=32)
    return root


def kd_distill_cifar100(cifar_root: Path, tmp_path: Path, teacher: str, student: str) -> dict:
    """``kd-distill data=cifar100 teacher=... student=... data.root=...`` as a user types it (fake data in the
    real format; one epoch each); its summary."""
    (tmp_path / "home").mkdir()
    result = run(
        "kd-distill",
        "data=cifar100",
        f"teacher={teacher}",
        f"student={student}",
        f"data.root={cifar_root}",
        "data.val_samples=100",
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        *QUIET,
        f"hydra.run.dir={tmp_path / 'run'}",
        home=tmp_path / "home",
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0 and "teacher/test_acc" in summary["metrics"]
    return summary


def test_kd_distill_cifar100_from_the_pickles(cifar_root: Path, tmp_path: Path) -> None:
    summary = kd_distill_cifar100(cifar_root, tmp_path, "resnet8x4", "resnet8")
    assert summary["teacher_params"] == 1_233_540 and summary["student_params"] == 83_892


@pytest.mark.slow
def test_kd_distill_cifar100_resnet32x4_to_resnet8x4_from_the_pickles(cifar_root: Path, tmp_path: Path) -> None:
    """The issue's command with the benchmark pair (about 40 s of resnet32x4 on one CPU core)."""
    summary = kd_distill_cifar100(cifar_root, tmp_path, "resnet32x4", "resnet8x4")
    assert summary["teacher_params"] == 7_433_860 and summary["student_params"] == 1_233_540


HF_TEACHER = [
    "teacher=hf_image",
    "student=hf_image",
    "loss=fitnet",
    "loss.terms.fitnet.student_layer=model.resnet.encoder.stages.1",
    "loss.terms.fitnet.teacher_layer=model.resnet.encoder.stages.1",
]


def test_hugging_face_image_teacher_and_student_with_feature_taps(cifar_root: Path, tmp_path: Path, kd_home) -> None:
    pytest.importorskip("transformers")
    overrides = [
        "data=cifar100",
        f"data.root={cifar_root}",
        "data.val_samples=100",
        "data.augment=null",
        *HF_TEACHER,
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        *QUIET,
    ]
    summary = distill(compose_config(tmp_path / "run", overrides))
    metrics = summary["metrics"]
    assert metrics["train/loss_fitnet"] > 0 and "val/agreement" in metrics
    assert summary["teacher_params"] > summary["student_params"]


def test_a_misspelt_tap_of_a_hugging_face_model_lists_the_nearest_names(cifar_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    # data.val_samples=100: the 5,000 default would hold out all 160 fake images (now its own error)
    overrides = ["data=cifar100", f"data.root={cifar_root}", "data.val_samples=100", *HF_TEACHER, *QUIET]
    overrides[-len(QUIET) - 1] = "loss.terms.fitnet.teacher_layer=model.resnet.encoder.stage.1"
    with pytest.raises(
        ConfigError, match=r"teacher_layer='model\.resnet\.encoder\.stage\.1'.*model\.resnet\.encoder\.stages"
    ):
        distill(compose_config(tmp_path / "run", overrides))


def test_hugging_face_models_build_from_a_local_directory_or_a_config(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    cfg = compose_config(tmp_path, ["data=digits", "student=hf_image"])
    model = build(cfg.student.model, "student.model")
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    model.model.save_pretrained(tmp_path / "saved")
    from kd_lightning.models.external import hf_image_classifier

    loaded = hf_image_classifier(num_classes=10, path=str(tmp_path / "saved"))
    loaded.eval(), model.eval()
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ConfigError, match=r"model\.path=.*does not exist.*nothing is downloaded"):
        hf_image_classifier(num_classes=10, path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="exactly one of path"):
        hf_image_classifier(num_classes=10)
