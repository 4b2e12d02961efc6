"""Every config group option composes and instantiates; a fast_dev_run of the default works."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.losses import DistillationLoss
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config, example_for

GROUPS = [
    "data",
    "teacher",
    "student",
    "loss",
    "optimizer",
    "scheduler",
    "trainer",
    "logger",
    "callbacks",
    "method",
    "runtime",
    "teacher_cache",
]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


#: Model builders that need the vision extra (torchvision, timm): run in its environment (pytest -m vision).
VISION_MODELS = {"kd_lightning.models.external.timm_model", "kd_lightning.models.external.torchvision_model"}


def builds_vision_model(group: str, option: str) -> bool:
    """Whether option ``option`` of ``group`` (teacher / student) builds a timm or torchvision model, by itself
    or through the group option it extends (``defaults: [torchvision]``)."""
    config = OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
    if OmegaConf.select(config, "model._target_") in VISION_MODELS:
        return True
    return any(
        isinstance(d, str) and d != "_self_" and builds_vision_model(group, d) for d in config.get("defaults", [])
    )


def marked(group: str, option: str) -> object:
    vision = group in ("teacher", "student") and builds_vision_model(group, option)
    return pytest.param(group, option, marks=pytest.mark.vision) if vision else (group, option)


@pytest.mark.parametrize(("group", "option"), [marked(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group: str, option: str, tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path, [f"{group}={option}"])
    node = cfg[group]
    if group in ("teacher", "student"):
        model = instantiate(node.model)
        logits = model(example_for(node.model))
        assert logits.shape == (2, cfg.data.num_classes)
    elif group in ("optimizer", "scheduler"):
        optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
        if group == "scheduler" and node:
            instantiate(node)(optimizer)
    elif group == "trainer" and node.accelerator == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU here: composition checked, instantiation needs one")
    elif group in ("logger", "callbacks"):
        for entry in node.values():
            instantiate(entry)
    elif group == "method":
        from kd_lightning.methods import Method
        from kd_lightning.recipes.components import method_factory
        from kd_lightning.recipes.stages import multi_stage_method, stage_config

        staged = multi_stage_method(cfg)
        stage_cfgs = [stage_config(cfg, s, tmp_path, None, last=False) for s in staged.stages(cfg)] if staged else [cfg]
        for stage_cfg in stage_cfgs:  # a multi-stage method: each stage's method, student and teachers
            factory, teachers = method_factory(stage_cfg)
            assert issubclass(factory.func, Method)
            assert instantiate(stage_cfg.student.model)(torch.randn(2, 1, 40)).shape == (2, cfg.data.num_classes)
            for teacher in teachers.values():
                assert instantiate(teacher.model)(torch.randn(2, 1, 40)).shape == (2, cfg.data.num_classes)
    elif group == "teacher_cache" and not node:
        assert option == "none"  # the empty option: no cache
    else:
        built = instantiate(node)
        if group == "loss":
            assert isinstance(built, DistillationLoss)


def test_train_config_composes(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, [], config_name="train")
    assert cfg.teacher.fit.max_epochs > 0


def test_command_line_style_overrides_reach_the_objects(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path, ["loss.temperature=2", "loss.alpha=0.5", "trainer.max_epochs=5", "seed=3", "scheduler=cosine"]
    )
    loss = instantiate(cfg.loss)
    assert (loss.alpha, loss.temperature, loss.terms["kd"].temperature) == (0.5, 2.0, 2.0)
    assert cfg.trainer.max_epochs == 5 and cfg.scheduler.T_max == 5 and cfg.seed == 3


def test_fast_dev_run_of_the_default(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*TINY, "+trainer.fast_dev_run=true", "logger=none"])
    summary = distill(cfg)
    assert 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["student_params"] > 0
    assert summary["cpu_threads"] == torch.get_num_threads()  # the threads the run used are recorded


def test_teacher_without_checkpoint_or_fit_is_used_as_built(tmp_path: Path, kd_home: Path) -> None:
    from kd_lightning.engine.instantiate import build
    from kd_lightning.recipes.teacher import obtain_teacher

    cfg = compose_config(tmp_path, ["teacher.fit=null"])
    model = build(cfg.teacher.model, "teacher.model")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    info = obtain_teacher(cfg, cfg.teacher, "teacher", model, tmp_path)
    assert info.source == "as built by kd_lightning.models.ConvNet1D" and info.fit_seconds == 0.0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_terms_combine_from_the_command_line(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path, ["loss=at", "student=cnn1d_narrow", "+loss.terms.kd._target_=kd_lightning.losses.KLDivergence"]
    )
    loss = instantiate(cfg.loss)
    assert set(loss.terms) == {"at", "kd"} and loss.terms["kd"].temperature == loss.temperature
