"""The CIFAR zoo (kd_lightning.models.cifar): parameter counts equal to the CRD / DKD reference code, logits of
the right shape, the documented tap points, and the conf/teacher and conf/student YAMLs of every model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.cli.renamed import CIFAR_NAMESAKES
from kd_lightning.models.cifar import ZOO
from tests.conftest import compose_config, model_target

#: name -> (parameters at 100 classes, the rounded figure quoted in the KD literature in millions, or None).
#: The exact counts are those of the reference code (HobbitLong/RepDistiller ``models/`` at eedab9d / b13aecc,
#: megvii-research/mdistiller ``mdistiller/models/cifar/`` at e8c5bb3; the two agree), each model rebuilt from it
#: outside this repository with ``num_classes=100`` and counted as ``sum(p.numel() for p in model.parameters())``;
#: loaded with the reference's weights, ours gave the same logits (train and eval mode) to within 1e-6.
#: The quoted figures of resnet110 (1.73M) and vgg8 (3.96M) are the exact counts truncated, not rounded.
PARAMS: dict[str, tuple[int, float | None]] = {
    "resnet8": (83_892, None),
    "resnet14": (181_108, None),
    "resnet20": (278_324, 0.28),
    "resnet32": (472_756, None),
    "resnet44": (667_188, None),
    "resnet56": (861_620, 0.86),
    "resnet110": (1_736_564, 1.73),
    "resnet8x4": (1_233_540, 1.23),
    "resnet32x4": (7_433_860, 7.43),
    "resnet50": (23_705_252, None),
    "wrn_16_1": (180_916, None),
    "wrn_16_2": (703_284, 0.70),
    "wrn_40_1": (569_780, 0.57),
    "wrn_40_2": (2_255_156, 2.26),
    "vgg8": (3_965_028, 3.96),
    "vgg11": (9_277_284, None),
    "vgg13": (9_462_180, 9.46),
    "vgg16": (14_774_436, None),
    "vgg19": (20_086_692, None),
    "mobilenetv2": (812_836, 0.81),
    "shufflenetv1": (949_258, 0.95),
    "shufflenetv2": (1_355_528, 1.36),
}

#: A tap: (module path, output shape per sample for a 32x32 input, documented as after a ReLU).
Tap = tuple[str, tuple[int, int, int], bool]


def resnet_taps(w: tuple[int, int, int, int]) -> list[Tap]:
    return [
        ("stem", (w[0], 32, 32), True),
        ("layer1", (w[1], 32, 32), True),
        ("layer2", (w[2], 16, 16), True),
        ("layer3", (w[3], 8, 8), True),
        ("pool", (w[3], 1, 1), True),
    ]


def wrn_taps(k: int) -> list[Tap]:
    return [
        ("stem", (16, 32, 32), False),
        ("stage1", (16 * k, 32, 32), False),
        ("stage2", (32 * k, 16, 16), False),
        ("stage3", (64 * k, 8, 8), False),
        ("stage2.0.relu1", (16 * k, 32, 32), True),
        ("stage3.0.relu1", (32 * k, 16, 16), True),
        ("norm", (64 * k, 8, 8), True),
        ("pool", (64 * k, 1, 1), True),
    ]


VGG_TAPS: list[Tap] = [
    ("stage1", (64, 32, 32), True),
    ("stage2", (128, 16, 16), True),
    ("stage3", (256, 8, 8), True),
    ("stage4", (512, 4, 4), True),
    ("stage5", (512, 4, 4), True),
    ("pool", (512, 1, 1), True),
]

TAPS: dict[str, list[Tap]] = {
    **{name: resnet_taps((16, 16, 32, 64)) for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44")},
    **{name: resnet_taps((16, 16, 32, 64)) for name in ("resnet56", "resnet110")},
    "resnet8x4": resnet_taps((32, 64, 128, 256)),
    "resnet32x4": resnet_taps((32, 64, 128, 256)),
    "resnet50": [
        ("stem", (64, 32, 32), True),
        ("layer1", (256, 32, 32), True),
        ("layer2", (512, 16, 16), True),
        ("layer3", (1024, 8, 8), True),
        ("layer4", (2048, 4, 4), True),
        ("pool", (2048, 1, 1), True),
    ],
    **{name: wrn_taps(int(name[-1])) for name in ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2")},
    **{name: VGG_TAPS for name in ("vgg8", "vgg11", "vgg13", "vgg16", "vgg19")},
    "mobilenetv2": [
        ("stem", (16, 16, 16), True),
        ("stage1", (12, 16, 16), False),
        ("stage2", (16, 8, 8), False),
        ("stage3", (48, 4, 4), False),
        ("stage4", (160, 2, 2), False),
        ("conv_last", (1280, 2, 2), True),
        ("pool", (1280, 1, 1), True),
    ],
    "shufflenetv1": [
        ("stem", (24, 32, 32), True),
        ("stage1", (240, 16, 16), True),
        ("stage2", (480, 8, 8), True),
        ("stage3", (960, 4, 4), True),
        ("pool", (960, 1, 1), True),
    ],
    "shufflenetv2": [
        ("stem", (24, 32, 32), True),
        ("stage1", (116, 16, 16), False),
        ("stage2", (232, 8, 8), False),
        ("stage3", (464, 4, 4), False),
        ("conv_last", (1024, 4, 4), True),
        ("pool", (1024, 1, 1), True),
    ],
}

#: The standard CIFAR teacher recipe (conf/teacher/fit/cifar.yaml).
CIFAR_FIT = {
    "max_epochs": 240,
    "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
    "scheduler": {
        "_target_": "torch.optim.lr_scheduler.MultiStepLR",
        "_partial_": True,
        "milestones": [150, 180, 210],
        "gamma": 0.1,
    },
}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_the_tables_cover_the_zoo() -> None:
    assert set(PARAMS) == set(TAPS) == set(ZOO)
    assert all(factory.__name__ == name for name, factory in ZOO.items())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_parameter_count_equals_the_reference(name: str) -> None:
    exact, quoted = PARAMS[name]
    assert count(ZOO[name]()) == count(ZOO[name](num_classes=100)) == exact
    if quoted is not None:
        assert abs(exact / 1e6 - quoted) < 0.01


@pytest.mark.parametrize("name", sorted(ZOO))
def test_logits_and_documented_taps(name: str) -> None:
    torch.manual_seed(0)
    model = ZOO[name](num_classes=100)
    seen: dict[str, list[Tensor]] = {}
    for path, _, _ in TAPS[name]:
        assert f"``{path}``" in type(model).__doc__, f"{path} is not documented in {type(model).__name__}"
        module = model.get_submodule(path)
        module.register_forward_hook(lambda _m, _i, out, path=path: seen.setdefault(path, []).append(out))
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 100)
    for path, shape, activated in TAPS[name]:
        (out,) = seen[path]  # the hook fired once
        assert out.shape == (2, *shape), path
        assert not activated or out.min() >= 0, f"{path} is documented as after a ReLU"
    # the pooled embedding is what the head reads
    assert torch.allclose(model.head(seen["pool"][0].flatten(1)), logits, atol=1e-6)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_num_classes(name: str) -> None:
    model = ZOO[name](num_classes=10).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_the_package_exports_keep_working() -> None:
    from kd_lightning.models import CifarResNet, resnet8x4, resnet32x4
    from kd_lightning.models.cifar import CifarResNet as cifar_resnet

    assert CifarResNet is cifar_resnet
    assert isinstance(resnet8x4(), CifarResNet) and isinstance(resnet32x4(num_classes=10), CifarResNet)
    assert [n for n, _ in resnet8x4().named_children()] == ["stem", "layer1", "layer2", "layer3", "pool", "head"]


def config_name(name: str) -> str:
    """The teacher / student option of zoo model ``name``: ``cifar_<name>`` where an ImageNet architecture
    has the same name (``cifar_resnet50``, ``cifar_mobilenetv2``), else the name (``resnet32x4``)."""
    return f"cifar_{name}" if name in CIFAR_NAMESAKES else name


def test_every_cifar_model_has_a_teacher_and_a_student_config() -> None:
    for group in ("teacher", "student"):
        cifar = set()
        for path in (Path(CONFIG_DIR) / group).glob("*.yaml"):
            target = model_target(group, path.stem)  # through conf/model/<name>.yaml
            if str(target).startswith("kd_lightning.models.cifar."):
                name = str(target).removeprefix("kd_lightning.models.cifar.")
                assert path.stem == config_name(name), path
                cifar.add(name)
        assert cifar == set(ZOO), group
    assert set(CIFAR_NAMESAKES) < set(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_configs_instantiate_the_model(name: str, tmp_path: Path) -> None:
    option = config_name(name)
    cfg = compose_config(tmp_path, [f"teacher={option}", f"student={option}", "data.num_classes=100"])
    expected = ZOO[name](num_classes=100)
    for group in ("teacher", "student"):
        node = cfg[group]
        assert node.model._target_ == f"kd_lightning.models.cifar.{name}"
        model = instantiate(node.model)
        assert type(model) is type(expected) and count(model) == PARAMS[name][0], group
    assert OmegaConf.to_container(cfg.teacher.fit) == CIFAR_FIT
    assert cfg.teacher.checkpoint is None and cfg.teacher.input is None


def test_the_teacher_recipe_is_shared_and_overridable(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, ["teacher=resnet32x4"])
    assert OmegaConf.to_container(cfg.teacher.fit) == CIFAR_FIT
    assert cfg.optimizer == compose_config(tmp_path, []).optimizer  # the student's optimizer is not the teacher's
    cfg = compose_config(tmp_path, ["teacher=resnet32x4", "teacher.fit.max_epochs=3", "teacher.fit.optimizer.lr=0.1"])
    assert cfg.teacher.fit.max_epochs == 3 and cfg.teacher.fit.optimizer.lr == 0.1
    assert cfg.teacher.fit.scheduler.milestones == [150, 180, 210]
    optimizer = instantiate(cfg.teacher.fit.optimizer)(params=[nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.teacher.fit.scheduler)(optimizer)
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["weight_decay"] == 5e-4
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR)
    assert compose_config(tmp_path, ["teacher=wrn_40_2"], config_name="train").teacher.fit.max_epochs == 240


@pytest.mark.parametrize(
    ("name", "linear_std"), [("resnet8x4", None), ("wrn_16_2", None), ("vgg8", 0.01), ("mobilenetv2", 0.01)]
)
def test_weights_start_as_the_reference_code_initialises_them(name: str, linear_std: float | None) -> None:
    """He-normal (fan-out) convolutions, BatchNorm 1 / 0, and N(0, 0.01) heads where the reference draws them."""
    torch.manual_seed(0)
    model = ZOO[name]()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.numel() > 20_000]
    for conv in convs:
        expected = (2.0 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1])) ** 0.5  # fan-out
        assert abs(float(conv.weight.std()) / expected - 1) < 0.1, name
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in norms)
    if linear_std is not None:
        assert abs(float(model.head.weight.std()) / linear_std - 1) < 0.1 and not model.head.bias.any()


def test_old_zoo_names_point_to_the_new_and_resnet50_on_cifar_gets_a_note(capsys: pytest.CaptureFixture) -> None:
    from kd_lightning.cli.renamed import CLASSIFIER_RENAMED, exit_on_renamed, renamed

    for name in CIFAR_NAMESAKES:
        message = renamed(f"student={name}", CLASSIFIER_RENAMED)
        assert message is not None and f"student=cifar_{name} now" in message
    assert renamed("teacher=resnet50", CLASSIFIER_RENAMED) is None  # torchvision's ResNet-50 now
    assert renamed("student=resnet32x4", CLASSIFIER_RENAMED) is None
    exit_on_renamed("kd-distill", ["teacher=resnet50", "student=resnet18"], CLASSIFIER_RENAMED)
    assert capsys.readouterr().err == ""
    exit_on_renamed("kd-distill", ["data=cifar100", "teacher=resnet50"], CLASSIFIER_RENAMED)
    assert "kd-distill: note: teacher=resnet50 is torchvision's" in capsys.readouterr().err
    with pytest.raises(SystemExit) as raised:
        exit_on_renamed("kd-train", ["teacher=vgg13"], CLASSIFIER_RENAMED)
    assert raised.value.code == 2 and "teacher=cifar_vgg13" in capsys.readouterr().err
