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
from tests.conftest import TINY, compose_config, example_for, model_target

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
    """Whether option ``option`` of ``group`` (teacher / student) builds a timm or torchvision model, through its
    conf/model file or the group option it extends (``defaults: [torchvision]``)."""
    return model_target(group, option) in VISION_MODELS


def marked(group: str, option: str) -> object:
    vision = group in ("teacher", "student") and builds_vision_model(group, option)
    return pytest.param(group, option, marks=pytest.mark.vision) if vision else (group, option)


#: What an option needs besides the defaults (a method whose stages need their kind of loss term).
NEEDS = {("method", "fitnets_two_stage"): ["loss=fitnet"]}


@pytest.mark.parametrize(("group", "option"), [marked(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_and_instantiates(group: str, option: str, tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path, [f"{group}={option}", *NEEDS.get((group, option), [])])
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


def model_defaults(group: str) -> dict[str, str]:
    """``option -> conf/model file`` for the options of ``group`` that name one (``/model@model: <name>``)."""
    found = {}
    for option in options(group):
        for entry in OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml").get("defaults", []):
            if not isinstance(entry, str) and "/model@model" in entry:
                found[option] = entry["/model@model"]
    return found


def test_every_model_file_is_a_teacher_or_student_model() -> None:
    used = set(model_defaults("teacher").values()) | set(model_defaults("student").values())
    assert set(options("model")) == used
    assert all(model_target("model", name) for name in options("model"))  # each builds something


@pytest.mark.parametrize("group", ["teacher", "student"])
def test_no_teacher_or_student_defines_its_own_model(group: str) -> None:
    """Every architecture lives once, in conf/model: an option pulls its model node from there (or extends an
    option that does) and only overrides arguments; a ``model._target_`` of its own would mirror a model file."""
    for option in options(group):
        config = OmegaConf.load(Path(CONFIG_DIR) / group / f"{option}.yaml")
        assert OmegaConf.select(config, "model._target_") is None, f"conf/{group}/{option}.yaml: use conf/model"
        assert model_target(group, option) is not None, f"conf/{group}/{option}.yaml has no model"


def test_model_files_compose_and_stay_overridable(tmp_path: Path) -> None:
    swap = "model@teacher.model=wrn_40_2"  # another conf/model file as the teacher's network
    overrides = ["teacher=resnet32x4", "student=resnet8x4", "student.model.num_classes=7", swap]
    cfg = compose_config(tmp_path, overrides)
    resnet8x4 = {"_target_": "kd_lightning.models.cifar.resnet8x4", "num_classes": 7}
    assert OmegaConf.to_container(cfg.student.model) == resnet8x4
    assert cfg.teacher.model._target_ == "kd_lightning.models.cifar.wrn_40_2" and cfg.teacher.fit.max_epochs == 240
    assert list(cfg.teacher) == ["fit", "model", "checkpoint", "input"]
    # one model file, the student's difference kept in its option
    cfg = compose_config(tmp_path, ["teacher=hf_text", "student=hf_text", "student.model.config.vocab_size=200"])
    teacher, student = cfg.teacher.model.config, cfg.student.model.config
    assert (teacher.hidden_size, teacher.num_hidden_layers, teacher.vocab_size) == (256, 4, 30522)
    assert (student.hidden_size, student.num_hidden_layers, student.vocab_size) == (128, 2, 200)
    cfg = compose_config(tmp_path, ["teacher=cnn1d_bn", "student=cnn1d_narrow"])
    assert (cfg.teacher.model.channels, cfg.teacher.model.batch_norm, cfg.student.model.channels) == (64, True, 8)
    assert "batch_norm" not in cfg.student.model and cfg.teacher.model._target_ == cfg.student.model._target_


def test_kd_trains_distill_command_keeps_a_swapped_teacher_network() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from kd_lightning.recipes.teacher import distill_command

    overrides = ["teacher=resnet8x4", "model@teacher.model=wrn_16_2", "teacher.model.num_classes=5", "seed=1"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        printed = distill_command("t.ckpt")
    finally:
        HydraConfig.instance().cfg = None
    expected = "data=mnist1d teacher=resnet8x4 model@teacher.model=wrn_16_2 teacher.model.num_classes=5 seed=1"
    assert printed == f"kd-distill {expected} teacher.checkpoint=t.ckpt"
