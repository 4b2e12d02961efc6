"""The vision extra: image folders read with torchvision, timm and torchvision models as teacher and student from
YAML only (feature taps included). Run in .venv-vision: ``bash scripts/test_vision.sh`` (``pytest -m vision``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.recipes.distill import distill
from tests.conftest import compose_config
from tests.image_fixtures import write_image_folder

pytestmark = pytest.mark.vision
torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

from kd_lightning.data.image_folder import ImageFolderDataModule  # noqa: E402

QUIET = ["logger=none", "+trainer.enable_progress_bar=false", "compare_scratch=false"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images"), per_class={"train": 8, "val": 3, "test": 2})


def test_image_folder_splits_transforms_and_indices(folder: Path, tmp_path: Path) -> None:
    dm = ImageFolderDataModule(str(folder), num_classes=3, resolution=32, batch_size=4, return_index=True)
    dm.setup()
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [24, 9, 6]
    assert dm.class_names == ["class_0", "class_1", "class_2"] and dm.random_augmentation
    x, _, index = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and index.tolist() == [0, 1, 2, 3]
    # Evaluation: resize to 32 / 0.875 = 37, centre crop 32, ImageNet normalisation.
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    image = Image.open(folder / "val" / "class_0" / "0.png")
    pixels = TF.to_dtype(TF.center_crop(TF.resize(TF.to_image(image), 37), 32), torch.float32, scale=True)
    expected = TF.normalize(pixels, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    torch.testing.assert_close(x[0], expected)
    # The ordered training loader is un-augmented: two passes agree.
    first, second = (next(iter(dm.ordered_dataloader("train")))[0] for _ in range(2))
    assert torch.equal(first, second)
    # Without val/: a seeded, disjoint share of train.
    only_train = write_image_folder(tmp_path / "only_train", per_class={"train": 10})
    held = ImageFolderDataModule(str(only_train), num_classes=3, resolution=16, val_fraction=0.2)
    held.setup()
    assert len(held.splits["train"]) == 24 and len(held.splits["val"]) == 6
    assert not set(held.splits["train"].indices) & set(held.splits["val"].indices)


def test_training_transforms_follow_the_config(folder: Path) -> None:
    from torchvision.transforms import v2

    def steps(**options) -> list[type]:
        return [
            type(t) for t in ImageFolderDataModule(str(folder), num_classes=3, **options).train_transform().transforms
        ]

    assert v2.RandomResizedCrop in steps() and v2.RandAugment not in steps()
    assert v2.RandAugment in steps(rand_augment=True)
    assert v2.RandomResizedCrop not in steps(train_augment=False) and v2.CenterCrop in steps(train_augment=False)
    assert not ImageFolderDataModule(str(folder), num_classes=3, train_augment=False).random_augmentation


def test_image_folder_errors_name_the_key_and_the_layout(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.root=.*no train folder.*train/<class>/<image>"):
        ImageFolderDataModule(str(tmp_path / "empty"), num_classes=3).setup()
    with pytest.raises(ConfigError, match=r"data\.num_classes=5 but .* has 3 class folders; set data\.num_classes=3"):
        ImageFolderDataModule(str(folder), num_classes=5).setup()


def image_run(folder: Path, *extra: str) -> list[str]:
    return [
        "data=image_folder",
        f"data.root={folder}",
        "data.num_classes=3",
        "data.resolution=32",
        "data.batch_size=8",
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        *QUIET,
        *extra,
    ]


def test_timm_teacher_to_timm_student_with_feature_taps(folder: Path, tmp_path: Path, kd_home: Path) -> None:
    overrides = image_run(
        folder,
        "teacher=timm",
        "teacher.model.name=resnet18",
        "student=timm",
        "student.model.name=mobilenetv3_small_050",
        "loss=fitnet",
        "loss.terms.fitnet.teacher_layer=layer3",
        "loss.terms.fitnet.student_layer=blocks.3",
    )
    summary = distill(compose_config(tmp_path / "run", overrides))
    assert summary["metrics"]["train/loss_fitnet"] > 0
    assert summary["teacher_params"] > 10 * summary["student_params"]


def test_torchvision_teacher_to_torchvision_student(folder: Path, tmp_path: Path, kd_home: Path) -> None:
    overrides = image_run(
        folder,
        "teacher=torchvision",
        "student=torchvision",
        "loss=fitnet",
        "loss.terms.fitnet.teacher_layer=layer4",
        "loss.terms.fitnet.student_layer=features.12",
    )
    summary = distill(compose_config(tmp_path / "run", overrides))
    assert summary["metrics"]["train/loss_fitnet"] > 0 and "val/agreement" in summary["metrics"]


def test_misspelt_names_list_what_the_library_has(folder: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"model\.name='resnet_18' is not a timm architecture; nearest: \[.*'resnet18'"
    ):
        distill(compose_config(tmp_path / "a", image_run(folder, "teacher=timm", "teacher.model.name=resnet_18")))
    with pytest.raises(ConfigError, match=r"is not a torchvision architecture; nearest: \[.*'mobilenet_v3_small'"):
        distill(
            compose_config(
                tmp_path / "b", image_run(folder, "student=torchvision", "student.model.name=mobilenet_v3_smal")
            )
        )
    with pytest.raises(ConfigError, match=r"teacher_layer='layer5'.*nearest valid names"):
        distill(
            compose_config(
                tmp_path / "c",
                image_run(
                    folder,
                    "teacher=timm",
                    "student=timm",
                    "loss=fitnet",
                    "loss.terms.fitnet.teacher_layer=layer5",
                    "loss.terms.fitnet.student_layer=blocks.3",
                ),
            )
        )


def test_asking_for_pretrained_weights_names_the_key_and_the_local_file(folder: Path, tmp_path: Path) -> None:
    """timm's / torchvision's own pretrained switches would download: one line naming the key and where a local
    file goes (teacher.checkpoint, student.model.weights), never "got multiple values for keyword argument"."""
    runs = [
        (
            "+teacher.model.pretrained=true",
            "teacher=timm",
            r"^teacher\.model\.pretrained=True asks timm .*teacher\.checkpoint=",
        ),
        (
            "+student.model.pretrained=true",
            "student=timm",
            r"^student\.model\.pretrained=True .*student\.model\.weights=",
        ),
        ("+teacher.model.pretrained=true", "teacher=torchvision", r"^teacher\.model\.pretrained=True asks torchvision"),
        (
            "student.model.weights=IMAGENET1K_V1",
            "student=torchvision",
            r"^student\.model\.weights=IMAGENET1K_V1 names ",
        ),
    ]
    for k, (override, group, named) in enumerate(runs):
        with pytest.raises(ConfigError, match=named) as error:
            distill(compose_config(tmp_path / str(k), image_run(folder, group, override)))
        assert "multiple values" not in str(error.value) and "no model hub here" in str(error.value)


def test_a_student_starts_from_local_weights_with_a_fresh_head(tmp_path: Path) -> None:
    from kd_lightning.models.external import timm_model

    pretrained = timm_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(pretrained.state_dict(), path)
    with pytest.raises(ConfigError, match=r"model\.weights=.*shape differs: fc\.bias, fc\.weight"):
        timm_model("resnet18", num_classes=3, weights=str(path))
    student = timm_model("resnet18", num_classes=3, weights=str(path), keep_mismatched=True)
    assert torch.equal(student.conv1.weight, pretrained.conv1.weight) and student.fc.out_features == 3


def test_symbolic_links_never_lead_out_of_or_back_into_the_folder(tmp_path: Path) -> None:
    """A loop (a class folder linking to its split) and a link to images elsewhere add no image: a folder of
    24 training images stays 24, each with its own class."""
    root = write_image_folder(tmp_path / "images", per_class={"train": 8, "val": 3})
    outside = write_image_folder(tmp_path / "elsewhere", per_class={"train": 5})
    (root / "train" / "class_0" / "loop").symlink_to(root / "train", target_is_directory=True)
    (root / "train" / "class_1" / "borrowed").symlink_to(outside / "train" / "class_2", target_is_directory=True)
    (root / "train" / "class_2" / "0_copy.png").symlink_to(outside / "train" / "class_0" / "0.png")
    dm = ImageFolderDataModule(str(root), num_classes=3, resolution=16)
    dm.setup()
    samples = dm._eval_train.samples
    assert len(samples) == 24 and all("loop" not in p and "borrowed" not in p and "copy" not in p for p, _ in samples)
    assert all(Path(p).parent.name == f"class_{label}" for p, label in samples)


def test_the_deit_preset_runs_a_cnn_teacher_into_a_deit_student_as_a_process(
    folder: Path, tmp_path: Path, kd_home: Path
) -> None:
    """README's `kd-distill experiment=resnet18_deit data.root=...`, end to end in its own process (torchvision's
    ResNet-18 teacher trained here, the Hugging Face DeiT student with its distillation head)."""
    import json

    from tests.test_cli import run

    overrides = [
        "experiment=resnet18_deit",
        f"data.root={folder}",
        "data.num_classes=3",
        "data.batch_size=8",
        "teacher.fit.max_epochs=1",
        "trainer.max_epochs=1",
        *QUIET,
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run("kd-distill", *overrides, home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["train/loss_deit"] > 0 and 0.0 <= summary["metrics"]["test/acc"] <= 1.0
    assert summary["teacher_params"] > 10 * summary["student_params"]
