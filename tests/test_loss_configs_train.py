"""Every registered loss trains a couple of steps end to end from its conf/loss/<name>.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hydra.utils import instantiate

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import TERMS
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config

#: Losses on conv feature maps need a conv student; the rest run with the default MLP student.
CONV_STUDENT = {"fitnet", "at", "vid", "reviewkd", "ickd", "nst", "srd", "ofd", "catkd", "wkd_f", "ft"}
OVERRIDES = [*TINY, "+trainer.fast_dev_run=2", "logger=none", "compare_scratch=false"]
#: SDD needs logits = head(global average of a conv map), which no MNIST-1D model has: CIFAR ResNets on digits.
POOLED_MAP = {"sdd": ["data=digits", "data.channels=3", "student=resnet8", "teacher=resnet8"]}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_loss_config_trains(name: str, tmp_path: Path, kd_home: Path) -> None:
    student = "cnn1d_narrow" if name in CONV_STUDENT else "mlp"
    overrides = [*OVERRIDES, f"loss={name}", f"student={student}"]
    if name in POOLED_MAP:  # digits has no MNIST-1D transfer set
        overrides = [o for o in OVERRIDES if not o.startswith("data.transfer_samples=")] + [f"loss={name}"]
        overrides += POOLED_MAP[name]
    cfg = compose_config(tmp_path / "run", overrides)
    metrics = distill(cfg)["metrics"]
    assert math.isfinite(metrics[f"train/loss_{name}"]) and 0.0 <= metrics["test/acc"] <= 1.0


#: Student and teacher from a model class defined in the tests package, not by the library.
CUSTOM_MODELS = [
    "~student.model",
    "+student.model={_target_:tests.custom_models.TinyNet,num_classes:${data.num_classes},width:4}",
    "~teacher.model",
    "+teacher.model={_target_:tests.custom_models.TinyNet,num_classes:${data.num_classes},width:8}",
]
#: The custom model's own dotted names for the layers a term reads (single-layer and multi-layer terms).
CUSTOM_LAYERS = {"layer": "blocks.1", "layers": "[stem,blocks.0,blocks.1]"}
#: Terms that read a map by {model, layer, io}: the map TinyNet's head reads after global average pooling.
CUSTOM_READS = {"sdd": ["loss.terms.sdd.student={layer:blocks}", "loss.terms.sdd.teacher={layer:blocks}"]}


def custom_layer_overrides(name: str, tmp_path: Path) -> list[str]:
    """``loss.terms.<name>.{student,teacher}_layer(s)=...`` for whichever of those keys the loss config has."""
    term = compose_config(tmp_path / "probe", [f"loss={name}"]).loss.terms[name]
    return [
        f"loss.terms.{name}.{side}_{kind}={CUSTOM_LAYERS[kind]}"
        for side in ("student", "teacher")
        for kind in ("layer", "layers")
        if f"{side}_{kind}" in term
    ]


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_loss_trains_a_model_the_library_did_not_define(name: str, tmp_path: Path, kd_home: Path) -> None:
    layers = [*custom_layer_overrides(name, tmp_path), *CUSTOM_READS.get(name, [])]
    overrides = [*OVERRIDES, *CUSTOM_MODELS, f"loss={name}", *layers]
    summary = distill(compose_config(tmp_path / "run", overrides))
    assert summary["config"]["student"]["model"]["_target_"] == "tests.custom_models.TinyNet"
    metrics = summary["metrics"]
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


def test_feature_loss_trains_under_bf16_mixed_precision(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(
        tmp_path / "run",
        [
            *TINY,
            "loss=fitnet",
            "student=cnn1d_narrow",
            "trainer.precision=bf16-mixed",
            "+trainer.fast_dev_run=2",
            "logger=none",
            "compare_scratch=false",
        ],
    )
    summary = distill(cfg)
    assert summary["adapter_params"] > 0
    assert math.isfinite(summary["metrics"]["train/loss_fitnet"])
