"""Label-free feature distillation from a foundation model (a tiny random Dinov2 saved to disk), then a probe: the
feature loss against its formula, the probe's frozen backbone, and the two-stage kd-distill run as a process."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.foundation import FoundationFeatures
from kd_lightning.methods import Probe
from kd_lightning.models.cifar import resnet8
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config
from tests.test_cli import run

transformers = pytest.importorskip("transformers")


def term_with_weights(pooled: str | None, patch: bool, distance: str, a: torch.Tensor, b: torch.Tensor):
    term = FoundationFeatures("layer3", pooled=pooled, patch=patch, distance=distance)
    term.setup_shapes(a, b, "loss.terms.features")
    return term.double()


def reference(term: FoundationFeatures, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The documented formula, written out: projections as matrix products, the patch grid equal to the map's."""
    distance = (
        (lambda x, y: (1 - (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))).mean())
        if (term.distance == "cosine")
        else F.smooth_l1_loss
    )
    total = torch.zeros((), dtype=torch.float64)
    if term.pooled is not None:
        lin = term.pooled_projection
        target = b[:, 0] if term.pooled == "cls" else b[:, 1:].mean(1)
        total = total + distance(a.mean((2, 3)) @ lin.weight.T + lin.bias, target)
    if term.patch:
        conv = term.patch_projection
        tokens = torch.einsum("bchw,dc->bhwd", a, conv.weight[:, :, 0, 0]) + conv.bias
        total = total + distance(tokens.reshape(a.shape[0], -1, b.shape[-1]), b[:, 1:])
    return total


@pytest.mark.parametrize(
    ("pooled", "patch", "distance"),
    [("cls", True, "cosine"), ("mean", False, "cosine"), (None, True, "smooth_l1"), ("cls", True, "smooth_l1")],
)
def test_feature_loss_is_the_documented_formula_in_value_and_gradient(pooled, patch, distance) -> None:
    torch.manual_seed(0)
    a = torch.randn(3, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 1 + 16, 6, dtype=torch.float64)
    term = term_with_weights(pooled, patch, distance, a, b)
    ours, ref = term(a, b), reference(term, a, b)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(ref, a)[0], rtol=1e-6, atol=1e-12)


def test_patch_part_resizes_the_map_to_the_teachers_grid_and_is_zero_when_it_matches() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 8, 8), torch.randn(2, 1 + 4, 3)
    term = FoundationFeatures("layer3", pooled=None, patch=True)
    term.setup_shapes(a, b, "k")
    with torch.no_grad():  # the projection the identity: the loss is 0 where the pooled 2x2 map equals the patches
        term.patch_projection.weight.copy_(torch.eye(3)[:, :, None, None])
        term.patch_projection.bias.zero_()
    grid = F.interpolate(a, size=(2, 2), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    matched = torch.cat([b[:, :1], grid], dim=1)
    assert term(a, matched).abs().item() < 1e-6 and term(a, b).item() > 0.1


@pytest.mark.parametrize(
    ("kwargs", "student", "teacher", "match"),
    [
        ({"pooled": "max"}, (2, 4, 2, 2), (2, 5, 3), "pooled='max'"),
        ({"distance": "l2"}, (2, 4, 2, 2), (2, 5, 3), "distance='l2'"),
        ({"pooled": None, "patch": False}, (2, 4, 2, 2), (2, 5, 3), "compare nothing"),
        ({}, (2, 4, 2, 2), (2, 3), "teacher_layer must output a token sequence"),
        ({}, (2, 4), (2, 5, 3), "student_layer must output a conv map"),
        ({}, (2, 4, 2, 2), (2, 6, 3), "not a square grid"),
    ],
)
def test_bad_settings_fail_in_one_line(kwargs, student, teacher, match) -> None:
    with pytest.raises(ConfigError, match=match):
        FoundationFeatures("layer3", **kwargs).setup_shapes(torch.zeros(student), torch.zeros(teacher), "k")


def test_linear_probe_starts_from_the_backbone_and_trains_only_the_head() -> None:
    torch.manual_seed(0)
    backbone = resnet8(num_classes=10)
    probe = Probe(resnet8(num_classes=10), 10, partial(torch.optim.SGD, lr=0.1), {"backbone": backbone}, "linear")
    assert all(
        torch.equal(p, q)
        for p, q in zip(probe.student.state_dict().values(), backbone.state_dict().values(), strict=True)
    )
    trainable = {name for name, p in probe.student.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    probe.train()
    assert probe.student.head.training and not probe.student.layer1.training
    finetune = Probe(resnet8(num_classes=10), 10, torch.optim.SGD, {"backbone": backbone}, "finetune")
    assert all(p.requires_grad for p in finetune.student.parameters())
    with pytest.raises(ConfigError, match=r"^method\.probe\.probe='full'"):
        Probe(resnet8(num_classes=10), 10, torch.optim.SGD, {"backbone": backbone}, "full")


def test_kd_distill_distils_a_saved_dinov2_then_probes_the_student(tmp_path: Path, kd_home: Path) -> None:
    torch.manual_seed(0)
    config = transformers.Dinov2Config(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    run_dir = tmp_path / "run"
    overrides = [
        "method=foundation_distill",
        "teacher=dinov2",
        f"teacher.model.path={tmp_path / 'dinov2'}",
        "teacher.model.config=null",
        "student=resnet8",
        "data=digits",
        "data.resolution=32",
        "data.channels=3",
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "+trainer.enable_progress_bar=false",
        "+trainer.limit_train_batches=3",
        "+trainer.limit_val_batches=2",
        "compare_scratch=false",
        "logger=none",
        f"hydra.run.dir={run_dir}",
    ]
    result = run("kd-distill", *overrides, home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [row["stage"] for row in summary["stages"]] == ["features", "probe"]
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    features = json.loads((run_dir / "stages" / "features" / "summary.json").read_text())
    assert math.isfinite(features["metrics"]["train/loss_features"]) and features["metrics"]["train/loss_features"] > 0
    probe = json.loads((run_dir / "stages" / "probe" / "summary.json").read_text())
    distilled = torch.load(features["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    probed = torch.load(probe["best_checkpoint"], map_location="cpu", weights_only=False)["state_dict"]
    assert any(key.startswith("loss.terms.features.") for key in distilled)  # the projections trained, were saved
    assert torch.equal(distilled["student.layer1.0.conv1.weight"], probed["student.layer1.0.conv1.weight"])
    assert not torch.equal(distilled["student.head.weight"], probed["student.head.weight"])


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("method.distil.distillation.terms.features.student_layer=nowhere", r"method\.distil\.distillation\.terms\."),
        ("method.probe.head=nowhere", r"method\.probe\.head='nowhere'"),
    ],
)
def test_wrong_layers_fail_before_any_stage_trains(override: str, match: str, tmp_path: Path, kd_home: Path) -> None:
    overrides = [*TINY, "method=foundation_distill", "teacher=dinov2", "student=resnet8", "data=digits", override]
    overrides += ["data.resolution=32", "data.channels=3"]
    with pytest.raises(ConfigError, match=match):
        distill(compose_config(tmp_path / "run", [o for o in overrides if "transfer_samples" not in o]))
    assert not (tmp_path / "run" / "stages").exists()
