"""Teacher input adapters (``teacher.input``): the student's batch converted to what the teacher expects,
wherever the teacher runs (steps, validation, the output cache, its own training here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data import DigitsDataModule
from kd_lightning.engine.caching.store import weights_digest
from kd_lightning.engine.errors import ConfigError
from kd_lightning.recipes.distill import distill
from kd_lightning.teacher import Teacher
from kd_lightning.teacher.outputs import TeacherOutputCache
from kd_lightning.teacher_inputs import AdaptedModel, ImageInput, TokenInput
from tests.conftest import compose_config

STUDENT = ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def test_image_input_renormalises_pixels_and_resizes() -> None:
    torch.manual_seed(0)
    pixels = torch.rand(4, 3, 16, 16)
    s_mean, s_std = (torch.tensor(v).view(1, 3, 1, 1) for v in STUDENT)
    t_mean, t_std = (torch.tensor(v).view(1, 3, 1, 1) for v in IMAGENET)
    student_view = (pixels - s_mean) / s_std
    adapter = ImageInput(
        size=24, student_mean=STUDENT[0], student_std=STUDENT[1], teacher_mean=IMAGENET[0], teacher_std=IMAGENET[1]
    )
    expected = F.interpolate((pixels - t_mean) / t_std, size=(24, 24), mode="bilinear", align_corners=False)
    torch.testing.assert_close(adapter(student_view), expected, atol=1e-5, rtol=0)
    # Same size and same statistics: the identity; a grey batch is repeated to the teacher's channels.
    torch.testing.assert_close(ImageInput()(student_view), student_view)
    grey = torch.randn(2, 1, 8, 8)
    assert torch.equal(ImageInput(channels=3)(grey), grey.expand(-1, 3, -1, -1))
    with pytest.raises(ConfigError, match=r"teacher\.input\.student_mean has 2 values"):
        ImageInput(student_mean=[0.1, 0.2], teacher_mean=[0.1, 0.2, 0.3])


def test_adapter_settings_are_part_of_the_teacher_digest() -> None:
    model = nn.Conv2d(3, 2, 1)
    digests = {
        weights_digest(AdaptedModel(ImageInput(size=size, teacher_mean=mean), model))
        for size, mean in ((24, None), (32, None), (24, [0.1, 0.2, 0.3]))
    }
    assert len(digests) == 3
    assert weights_digest(AdaptedModel(TokenInput("a_"), model)) != weights_digest(
        AdaptedModel(TokenInput("b_"), model)
    )


def test_token_input_hands_the_teacher_its_own_tokenisation() -> None:
    batch = {
        "input_ids": torch.ones(2, 3),
        "teacher_input_ids": torch.zeros(2, 5),
        "teacher_attention_mask": torch.ones(2, 5),
    }
    assert set(TokenInput()(batch)) == {"input_ids", "attention_mask"}
    assert TokenInput()(batch)["input_ids"].shape == (2, 5)
    with pytest.raises(ConfigError, match=r"data\.teacher_tokenizer"):
        TokenInput()({"input_ids": torch.ones(2, 3)})


class ExpectsSize(nn.Module):
    """A linear classifier that refuses any input but ``size`` x ``size`` images (what its adapter must make)."""

    def __init__(self, num_classes: int = 10, size: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.size = size
        self.head = nn.Linear(channels * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.size, self.size):
            raise AssertionError(f"teacher got {tuple(x.shape)}, not {self.size}x{self.size}")
        return self.head(x.flatten(1))


def test_teacher_outputs_and_cache_read_through_the_adapter(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    data = DigitsDataModule()
    adapter = ImageInput(size=16)
    torch.manual_seed(0)
    model = ExpectsSize()
    teacher = Teacher(model, input=adapter, cache=TeacherOutputCache("memory"))
    x = data.example_input()
    expected = model(F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False))
    torch.testing.assert_close(teacher.outputs(x)["logits"], expected)
    teacher.cache.prepare(AdaptedModel(adapter, model), data, ("val",), torch.device("cpu"))
    stored = teacher.logits(x, "val", torch.arange(2))
    torch.testing.assert_close(stored, expected, atol=2e-3, rtol=2e-3)  # float16 table


def test_kd_distill_trains_and_distils_a_teacher_through_its_adapter(tmp_path: Path, kd_home: Path) -> None:
    pytest.importorskip("sklearn")
    overrides = [
        "data=digits",
        "student=mlp",
        "student.model.in_features=64",
        "teacher.model._target_=tests.test_teacher_inputs.ExpectsSize",
        "~teacher.model.channels",
        "~teacher.model.depth",
        "~teacher.model.kernel_size",
        "+teacher.model.size=16",
        "teacher.input={_target_: kd_lightning.teacher_inputs.ImageInput, size: 16}",
        "teacher.fit.max_epochs=2",
        "trainer.max_epochs=1",
        "compare_scratch=false",
        "teacher_cache=memory",
        "logger=none",
        "+trainer.enable_progress_bar=false",
    ]
    summary = distill(compose_config(tmp_path / "run", overrides))
    # ExpectsSize raises on anything but 16x16, so the teacher's fit, the cache fill and validation all read
    # the adapter's output; a linear model on digits learns well above chance in two epochs.
    assert summary["metrics"]["teacher/test_acc"] > 0.5
