"""DeiT's distillation token (Touvron et al. 2021): the loss against the authors' code, the two heads of the student
(class head in training, the heads' average at evaluation), and a kd-distill run as a process."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss
from kd_lightning.losses.deit import DeiTDistillation
from kd_lightning.methods import DeiTDistillationModule
from kd_lightning.models.cifar import resnet8
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config
from tests.test_cli import REPO, run

transformers = pytest.importorskip("transformers")

DIST_HEAD = "model.distillation_classifier"


def authors_distillation_loss(
    outputs: Tensor, outputs_kd: Tensor, labels: Tensor, teacher_outputs: Tensor, kind: str, alpha: float, tau: float
) -> Tensor:
    """Transcribed from facebookresearch/deit, ``losses.py``, ``DistillationLoss.forward`` (base criterion
    ``torch.nn.CrossEntropyLoss()``; the teacher's forward replaced by its outputs)."""
    base_loss = F.cross_entropy(outputs, labels)
    if kind == "soft":
        T = tau
        # taken from https://github.com/peterliht/knowledge-distillation-pytorch/blob/master/model/net.py#L100
        # with slight modifications
        distillation_loss = (
            F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (T * T)
            / outputs_kd.numel()
        )
    elif kind == "hard":
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    loss = base_loss * (1 - alpha) + distillation_loss * alpha
    return loss


@pytest.mark.parametrize(("mode", "alpha", "tau"), [("hard", 0.5, 1.0), ("soft", 0.5, 3.0), ("soft", 0.1, 1.5)])
def test_loss_matches_the_authors_code_in_value_and_gradient(mode: str, alpha: float, tau: float) -> None:
    torch.manual_seed(0)
    cls, dist = (torch.randn(6, 7, dtype=torch.float64, requires_grad=True) for _ in range(2))
    teacher, labels = 3 * torch.randn(6, 7, dtype=torch.float64), torch.randint(0, 7, (6,))
    loss = DistillationLoss({"deit": DeiTDistillation(mode, student_layer=DIST_HEAD)}, alpha=alpha, temperature=tau)
    ours = loss({"student": {"logits": cls, DIST_HEAD: dist}, "teacher": {"logits": teacher}}, labels).total
    ref = authors_distillation_loss(cls, dist, labels, teacher, mode, alpha, tau)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(ours, (cls, dist))
    for got, want in zip(grads, torch.autograd.grad(ref, (cls, dist)), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-12)


def test_hard_mode_at_half_alpha_is_the_papers_average_of_two_cross_entropies() -> None:
    torch.manual_seed(1)
    cls, dist, teacher = (torch.randn(5, 4, dtype=torch.float64) for _ in range(3))
    labels = torch.randint(0, 4, (5,))
    loss = DistillationLoss({"deit": DeiTDistillation("hard", student_layer=DIST_HEAD)}, alpha=0.5)
    total = loss({"student": {"logits": cls, DIST_HEAD: dist}, "teacher": {"logits": teacher}}, labels).total
    expected = 0.5 * F.cross_entropy(cls, labels) + 0.5 * F.cross_entropy(dist, teacher.argmax(1))
    assert torch.allclose(total, expected, rtol=1e-12)


@pytest.mark.parametrize(("kwargs", "match"), [({"mode": "medium"}, "mode='medium'"), ({"temperature": 0}, "> 0")])
def test_bad_options_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        DeiTDistillation(**kwargs)


def tiny_deit(num_classes: int = 10) -> torch.nn.Module:
    cfg = OmegaConf.load(REPO / "conf" / "model" / "deit_tiny.yaml")
    cfg.model.config.num_labels = num_classes
    return instantiate(cfg)


def deit_module(mode: str = "hard") -> DeiTDistillationModule:
    torch.manual_seed(0)
    distillation = DistillationLoss({"deit": DeiTDistillation(mode, student_layer=DIST_HEAD)}, alpha=0.5)
    return DeiTDistillationModule(
        student=tiny_deit(),
        distillation=distillation,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        num_classes=10,
        teachers={"teacher": resnet8(num_classes=10)},
    )


def test_training_reads_the_class_head_and_evaluation_averages_the_two_heads() -> None:
    module = deit_module()
    x = torch.randn(3, 3, 32, 32)
    module.setup_for(x)  # checks the output is the heads' average
    module.student.eval()
    heads = module.student.model(pixel_values=x)
    with torch.no_grad():
        evaluated = module.student_outputs(x)
        assert torch.allclose(evaluated["logits"], (heads.cls_logits + heads.distillation_logits) / 2, atol=1e-6)
        assert torch.allclose(module.student(x), evaluated["logits"])
        module.student.train()
        torch.manual_seed(3)
        trained = module.student_outputs(x)
        torch.manual_seed(3)
        raw = module.student.model(pixel_values=x)
    assert torch.allclose(trained["logits"], raw.cls_logits, atol=1e-6)
    assert torch.allclose(trained[DIST_HEAD], raw.distillation_logits, atol=1e-6)


def test_a_one_head_student_is_refused_naming_the_key() -> None:
    distillation = DistillationLoss({"deit": DeiTDistillation(student_layer="layer3")}, alpha=0.5)
    module = DeiTDistillationModule(
        student=resnet8(num_classes=10),
        distillation=distillation,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        num_classes=10,
        cls_head="head",
        teachers={"teacher": resnet8(num_classes=10)},
    )
    with pytest.raises(ConfigError, match=r"not the average of method\.cls_head"):
        module.setup_for(torch.randn(2, 3, 32, 32))


def test_a_distillation_without_a_deit_term_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^method\.distillation\.terms must hold"):
        DeiTDistillationModule(
            student=tiny_deit(), distillation=DistillationLoss({}), optimizer=torch.optim.SGD, num_classes=10
        )


@pytest.mark.vision
def test_timm_distilled_vit_trains_through_its_two_heads() -> None:
    timm = pytest.importorskip("timm")
    student = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8, depth=1
    )
    distillation = DistillationLoss({"deit": DeiTDistillation(student_layer="head_dist")}, alpha=0.5)
    module = DeiTDistillationModule(
        student=student,
        distillation=distillation,
        optimizer=torch.optim.SGD,
        num_classes=10,
        cls_head="head",
        teachers={"teacher": resnet8(num_classes=10)},
    )
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    module.setup_for(x)  # checks on this batch that timm's output averages the two heads
    module.student.train()
    outputs = module.student_outputs(x)
    features = student.forward_features(x)
    cls, dist = student.head(features[:, 0]), student.head_dist(features[:, 1])
    # Training: the task term reads the class head, the DeiT term the distillation head.
    torch.testing.assert_close(outputs["logits"], cls, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs["head_dist"], dist, rtol=1e-5, atol=1e-6)
    loss = module.loss({"student": outputs, **module.distilled_outputs(x, "train", None)}, y)
    assert loss.parts["ce"] > 0 and loss.parts["deit"] > 0
    loss.total.backward()
    for head in (student.head, student.head_dist):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # Evaluation: the prediction averages both heads.
    module.student.eval()
    with torch.no_grad():
        features = student.forward_features(x)
        average = (student.head(features[:, 0]) + student.head_dist(features[:, 1])) / 2
        torch.testing.assert_close(module.student_outputs(x)["logits"], average, rtol=1e-5, atol=1e-6)


def test_the_preset_composes_with_a_cnn_teacher_and_the_tiny_deit() -> None:
    cfg = compose_config(Path("/tmp/unused"), ["experiment=resnet18_deit", "data.resolution=48"])
    assert cfg.method._target_.endswith("DeiTDistillationModule")
    assert cfg.teacher.model.name == "resnet18" and cfg.data._target_.endswith("ImageFolderDataModule")
    assert cfg.student.model.model.config.image_size == 48


def test_kd_distill_runs_a_tiny_deit_student_on_digits(tmp_path: Path, kd_home: Path) -> None:
    overrides = [
        "method=deit",
        "student=deit_tiny",
        "teacher=resnet8",
        "data=digits",
        "data.resolution=32",
        "data.channels=3",
        "trainer.max_epochs=1",
        "teacher.fit.max_epochs=1",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2",
        "compare_scratch=false",
        "logger=none",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run("kd-distill", *overrides, home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["train/loss_deit"] > 0 and 0.0 <= metrics["test/acc"] <= 1.0


def test_a_student_without_the_heads_fails_before_the_teacher_trains(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*TINY, "method=deit", "logger=none", "compare_scratch=false"])
    with pytest.raises(ConfigError, match=r"^method\.distillation\.terms\.deit\.student_layer='model\.distillation_"):
        distill(cfg)
    assert not (tmp_path / "run" / "teacher").exists()
