"""Method options and model keywords checked before anything trains, each refused in one line naming its key:
method options (types, values, names), the teacher's tokenisation, pretrained-weight switches of timm /
torchvision (checked without importing either), a Hugging Face head of another class count; a method's YAML
selecting what it needs (method=data_free alone); and every ``group=option`` a config comment names exists."""

from __future__ import annotations

import math
import re
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.instantiate import build, build_partial
from kd_lightning.methods import DataFreeDistillation, Method, MultiTeacherDistillation, MutualLearning, Supervised
from kd_lightning.methods.multi_teacher import checked_weights
from kd_lightning.recipes.distill import distill
from kd_lightning.recipes.preflight import check_option_names
from kd_lightning.recipes.teacher import check_teacher_tokenizer
from tests.conftest import compose_config

TEACHERS = {"student": nn.Linear(4, 3), "teacher_0": nn.Linear(4, 3), "teacher_1": nn.Linear(4, 3)}


# ------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize(
    ("weights", "named"),
    [
        ({"teacher_0": math.nan, "teacher_1": 1.0}, r"method\.weights\.teacher_0=nan must be a finite number >= 0"),
        ({"teacher_0": -1.0, "teacher_1": 1.0}, r"method\.weights\.teacher_0=-1\.0 must be a finite number >= 0"),
        ({"teacher_0": math.inf, "teacher_1": 1.0}, r"method\.weights\.teacher_0=inf"),
        ({"teacher_0": True, "teacher_1": 1.0}, r"method\.weights\.teacher_0=True"),
        ({"teacher_0": 1.0}, r"method\.weights=\{'teacher_0': 1\.0\} must give every teacher"),
        ({"teacher_0": 1.0, "teacher_1": 1.0, "teacher_2": 1.0}, r"method\.weights=.* must give every teacher"),
        ([1.0, 2.0], r"method\.weights=\[1\.0, 2\.0\] must give every teacher .*teacher_0: 1\.0"),
        ({"teacher_0": 0.0, "teacher_1": 0}, r"method\.weights=.* are all 0"),
        (None, r"method\.weights=None must give every teacher"),
    ],
)
def test_bad_multi_teacher_weights_name_method_weights_before_any_teacher_is_trained(weights, named: str) -> None:
    with pytest.raises(ConfigError, match=named) as error:
        MultiTeacherDistillation.check_options({"combine": "weights", "weights": weights}, TEACHERS)
    assert "\n" not in str(error.value) and "non-finite" not in str(error.value)  # the input is named, no teacher


def test_weights_with_a_combination_that_ignores_them_are_refused_naming_both_keys() -> None:
    for combine in ("mean", "confidence"):
        with pytest.raises(ConfigError, match=rf"^method\.weights=.* is ignored by method\.combine={combine}"):
            MultiTeacherDistillation.check_options({"combine": combine, "weights": {"teacher_0": 1}}, TEACHERS)
    assert checked_weights("mean", None, ["a", "b"]) is None
    assert checked_weights("weights", {"a": 1, "b": 3}, ["a", "b"]) == {"a": 0.25, "b": 0.75}
    with pytest.raises(ConfigError, match=r"method\.combine='vote'"):
        MultiTeacherDistillation.check_options({"combine": "vote"}, TEACHERS)


def test_mutual_learning_takes_only_a_bool_for_optimizer_per_peer() -> None:
    with pytest.raises(ConfigError, match=r"^method\.optimizer_per_peer='maybe' must be bool"):
        MutualLearning.check_options({"optimizer_per_peer": "maybe"}, {})
    with pytest.raises(ConfigError, match=r"method\.optimizer_per_peer=1 must be bool"):
        MutualLearning(
            student=nn.Linear(4, 3),
            loss=None,
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=3,
            peers={"peer_1": nn.Linear(4, 3)},
            optimizer_per_peer=1,
        )
    MutualLearning.check_options({"optimizer_per_peer": True}, {})


def test_other_method_options_are_typed() -> None:
    with pytest.raises(ConfigError, match=r"method\.label_smoothing='abc' must be int or float"):
        Supervised.check_options({"label_smoothing": "abc"}, {})
    with pytest.raises(ConfigError, match=r"method\.label_smoothing=nan must be in \[0, 1\)"):
        Supervised.check_options({"label_smoothing": math.nan}, {})
    bn_teacher = {"student": nn.Linear(4, 3), "teacher": nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))}
    for key, value, named in (
        ("batch_size", True, r"method\.batch_size=True must be int"),
        ("steps_per_epoch", 0, r"method\.steps_per_epoch=0 must be an integer >= 1"),
        ("student_steps", 2.5, r"method\.student_steps=2\.5 must be int"),
        ("adv_weight", math.nan, r"method\.adv_weight=nan must be a finite number >= 0"),
        ("bn_weight", "high", r"method\.bn_weight='high' must be int or float"),
        ("generator_lr", 0, r"method\.generator_lr=0 must be a finite number > 0"),
        ("targets", "soft", r"method\.targets='soft'"),
    ):
        with pytest.raises(ConfigError, match=named):
            DataFreeDistillation.check_options({key: value}, bn_teacher)


def factory_of(method: str, *overrides: str):
    cfg = compose_config(Path("/tmp/unused"), [f"method={method}", *overrides])
    return build_partial(cfg.method, "method", Method, "kd_lightning.methods.Method", pop="teachers")[0]


def test_a_misspelt_method_option_is_named_with_the_nearest_ones() -> None:
    with pytest.raises(ConfigError, match=r"^method\.optimizer_per_pear is not an option of MutualLearning; did you "):
        check_option_names(factory_of("mutual", "+method.optimizer_per_pear=true"))
    with pytest.raises(ConfigError, match=r"method\.combin is not an option .*method\.combine.*~method\.combin\)$"):
        check_option_names(factory_of("multi_teacher", "+method.combin=weights"))
    for method in ("kd", "multi_teacher", "mutual", "data_free", "supervised"):
        check_option_names(factory_of(method))  # every shipped method config names only options it has


def test_a_teacher_tokenizer_without_a_teacher_input_names_both_keys() -> None:
    data = OmegaConf.create({"teacher_tokenizer": "/tok/teacher"})
    plain = OmegaConf.create({"model": {}, "input": None})
    reads_its_own = OmegaConf.create({"model": {}, "input": {"_target_": "kd_lightning.teacher_inputs.TokenInput"}})
    with pytest.raises(ConfigError) as error:
        check_teacher_tokenizer(data, {"teacher": plain})
    message = str(error.value)
    assert message.startswith("data.teacher_tokenizer=/tok/teacher") and "teacher.input is null" in message
    assert "teacher.input='{_target_: kd_lightning.teacher_inputs.TokenInput}'" in message
    with pytest.raises(ConfigError, match=r"method\.teachers\.teacher_0\.input is null"):
        check_teacher_tokenizer(data, {"teacher_0": plain, "teacher_1": plain})
    check_teacher_tokenizer(data, {"teacher": reads_its_own})
    check_teacher_tokenizer(data, {"teacher_0": plain, "teacher_1": reads_its_own})  # teacher_0 shares the student's
    check_teacher_tokenizer(OmegaConf.create({"teacher_tokenizer": None}), {"teacher": plain})
    check_teacher_tokenizer(data, {})  # no teacher (method=supervised): nothing reads it


# -------------------------------------------------------------------------------- model keywords
def model_node(builder: str, **settings) -> dict:
    return {"_target_": f"kd_lightning.models.external.{builder}", "name": "resnet18", "num_classes": 10, **settings}


@pytest.mark.parametrize(
    ("builder", "key", "settings", "named"),
    [
        (
            "timm_model",
            "teacher.model",
            {"pretrained": True},
            r"^teacher\.model\.pretrained=True .*teacher\.checkpoint=",
        ),
        (
            "timm_model",
            "student.model",
            {"pretrained": True},
            r"^student\.model\.pretrained=True .*student\.model\.weights=",
        ),
        ("torchvision_model", "teacher.model", {"pretrained": True}, r"^teacher\.model\.pretrained=True"),
        ("torchvision_model", "student.model", {"weights": "DEFAULT"}, r"^student\.model\.weights=DEFAULT names "),
        (
            "torchvision_model",
            "method.teachers.teacher_1.model",
            {"weights": "ResNet18_Weights.IMAGENET1K_V1"},
            r"^method\.teachers\.teacher_1\.model\.weights=ResNet18_Weights.* method\.teachers\.teacher_1\.checkpoint=",
        ),
        ("timm_model", "student.model", {"weights": 3}, r"^student\.model\.weights=3 must be the path"),
    ],
)
def test_pretrained_switches_name_the_key_and_the_local_file_alternative(builder, key, settings, named) -> None:
    """Refused before timm / torchvision are imported: this runs without the vision extra."""
    with pytest.raises(ConfigError, match=named) as error:
        build(OmegaConf.create(model_node(builder, **settings)), key)
    assert "multiple values" not in str(error.value) and "no model hub here" in str(error.value)


def test_pretrained_false_is_accepted_as_the_default_it_is() -> None:
    from kd_lightning.models.external import check_offline

    kwargs = {"pretrained": False, "drop_rate": 0.1}
    check_offline("timm", kwargs, None)
    assert kwargs == {"drop_rate": 0.1}  # not passed on twice (timm_model passes pretrained=False itself)


def test_a_hugging_face_head_of_another_class_count_names_data_num_classes(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from kd_lightning.models.external import hf_sequence_classifier

    tiny = {"model_type": "bert", "vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1}
    tiny |= {"num_attention_heads": 2, "intermediate_size": 32}
    hf_sequence_classifier(num_classes=3, config=tiny).model.save_pretrained(tmp_path / "three")
    node = {"_target_": "kd_lightning.models.external.hf_sequence_classifier", "num_classes": 5}
    node |= {"path": str(tmp_path / "three"), "config": None, "pretrained_options": None}
    with pytest.raises(ConfigError) as error:
        build(OmegaConf.create(node), "teacher.model")
    message = str(error.value)
    assert message.startswith(f"teacher.model.path={tmp_path / 'three'} has a classification head of 3 classes")
    assert "teacher.model.num_classes=5 (data.num_classes)" in message and "data.num_classes=3" in message
    assert "teacher.model.pretrained_options.ignore_mismatched_sizes=true" in message
    fresh = build(OmegaConf.create({**node, "pretrained_options": {"ignore_mismatched_sizes": True}}), "teacher.model")
    assert fresh.model.config.num_labels == 5  # the fix it names works
    with pytest.raises(
        ConfigError,
        match=r"^student\.model\.config\.num_labels=4, but .*student\.model\.num_classes=3 \(data\.num_classes\)",
    ):
        build(
            OmegaConf.create({**node, "path": None, "num_classes": 3, "config": {**tiny, "num_labels": 4}}),
            "student.model",
        )


# --------------------------------------------------------------------------------- method YAMLs
def test_method_data_free_alone_selects_its_batch_norm_teacher(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", ["method=data_free"])
    assert cfg.teacher.model.batch_norm is True and cfg.method.teachers.teacher.model.batch_norm is True
    chosen = compose_config(tmp_path / "other", ["method=data_free", "teacher=cnn1d"])  # the command line wins
    assert "batch_norm" not in chosen.teacher.model
    assert "batch_norm" not in compose_config(tmp_path / "kd", []).teacher.model  # other methods keep cnn1d
    quick = ["trainer.max_epochs=1", "method.steps_per_epoch=2", "method.batch_size=16", "method.student_steps=1"]
    quick += ["teacher.fit=null", "compare_scratch=false", "logger=none", "+trainer.enable_progress_bar=false"]
    summary = distill(compose_config(tmp_path / "run", ["method=data_free", *quick, "trainer.accelerator=cpu"]))
    assert "train/loss_generator" in summary["metrics"] and "test/acc" in summary["metrics"]


#: ``group=option`` in a comment: a config group of conf/ (a directory) and the option it selects (not a keyword
#: argument of a Python call, ``f(x, teacher=teacher)``).
MENTION = re.compile(r"(?<![\w./$(-])(?<!, )\+?([a-z_]+(?:/[a-z_]+)*)=([A-Za-z0-9_]+)(?![\w.{/])")


def test_every_group_option_a_config_comment_names_exists() -> None:
    conf = Path(CONFIG_DIR)
    missing, checked = [], 0
    for path in sorted(conf.rglob("*.yaml")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "#" not in line:
                continue
            for group, option in MENTION.findall(line[line.index("#") :]):
                if not (conf / group).is_dir() or option == "null":
                    continue
                checked += 1
                if not (conf / group / f"{option}.yaml").is_file():
                    missing.append(f"{path.relative_to(conf)}:{number}: {group}={option}")
    assert checked > 30  # the pattern finds the examples the comments give
    assert not missing, missing


#: Command-line values by the type Hydra parses them to: each option gets one whose type it does not take.
WRONG = {int: "12", str: "abc", bool: "true"}


@pytest.mark.parametrize("config", ["distill", "train", "llm_distill"])
def test_every_top_level_option_is_typed_and_a_wrong_type_is_one_line(config: str, tmp_path: Path) -> None:
    """Each top-level option of the three tools' configs has a declared type (RUN_OPTIONS), and a value of
    another type is one line naming the key (checked by check_run_options, which each tool runs first)."""
    from omegaconf import DictConfig, ListConfig

    from kd_lightning.engine.checks import RUN_OPTIONS, check_run_options
    from tests.conftest import compose_config

    cfg = compose_config(tmp_path, [], config_name=config)
    scalars = {key for key, value in cfg.items() if not isinstance(value, DictConfig | ListConfig)}
    assert scalars <= set(RUN_OPTIONS), scalars - set(RUN_OPTIONS)
    for key in sorted(scalars):
        wrong = next(value for kind, value in WRONG.items() if kind not in RUN_OPTIONS[key])
        bad = compose_config(tmp_path, [f"{key}={wrong}"], config_name=config)
        with pytest.raises(ConfigError) as error:
            check_run_options(bad)
        assert str(error.value).startswith(f"{key}=") and "\n" not in str(error.value), key
