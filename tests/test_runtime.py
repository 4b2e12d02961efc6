"""Runtime options: teacher autocast, channels-last conv nets, compile (slow), CPU threads, bad values."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.engine import threads
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import resnet8x4
from kd_lightning.teacher.outputs import TeacherOutputCache
from tests.conftest import compose_config, tiny_trainer


def train_steps(runtime: Runtime, steps: int = 2) -> DistillationModule:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))), batch_size=4)
    module = DistillationModule(
        student=resnet8x4(num_classes=10),
        teacher=resnet8x4(num_classes=10),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.5),
        optimizer=partial(torch.optim.SGD, lr=0.01),
        num_classes=10,
        runtime=runtime,
    )
    trainer = tiny_trainer(
        max_steps=steps,
    )
    trainer.fit(module, data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    return module


def test_teacher_autocast_gives_float32_outputs_close_to_full_precision() -> None:
    module = train_steps(Runtime(teacher_precision="bf16"), steps=1)
    x = torch.randn(4, 3, 32, 32)
    low = module.teacher_outputs(x)["logits"]
    module.teachers["teacher"].precision = None
    full = module.teacher_outputs(x)["logits"]
    assert not torch.equal(low, full)  # the first really ran in bf16
    assert low.dtype == torch.float32 and not low.is_inference()
    assert torch.allclose(low, full, atol=0.1, rtol=0.05)


def test_channels_last_trains_conv_nets_in_that_memory_format() -> None:
    module = train_steps(Runtime(channels_last=True))
    conv = module.student.stem[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow  # inductor compiles for a minute on 2 CPU cores
def test_compiled_teacher_and_student_train() -> None:
    train_steps(Runtime(compile="both"))


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"teacher_precision": "int8"}, "runtime.teacher_precision"),
        ({"compile": "everything"}, "runtime.compile"),
        ({"cpu_threads": 0}, "runtime.cpu_threads"),
    ],
)
def test_bad_runtime_values_name_their_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Runtime(**options)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"location": "cloud"}, "teacher_cache.location"),
        ({"location": "disk"}, "teacher_cache=disk needs teacher_cache.directory"),
        ({"location": "memory", "dtype": "int4"}, "teacher_cache.dtype"),
        ({"location": "memory", "top_k": 0}, "teacher_cache.top_k"),
    ],
)
def test_bad_teacher_cache_values_name_their_key(options: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        TeacherOutputCache(**options)


# ------------------------------------------------------------------------------------------ cpu_threads
@pytest.mark.parametrize("config_name", ["distill", "train", "llm_distill", "llm_generate"])
def test_every_entry_point_has_the_shared_cpu_threads_option_defaulting_to_auto(
    config_name: str, tmp_path: Path
) -> None:
    cfg = compose_config(tmp_path, ["cpu_threads=3"], config_name=config_name)
    assert cfg.cpu_threads == 3
    assert compose_config(tmp_path, [], config_name=config_name).cpu_threads == "auto"
    if config_name == "distill":  # kd-distill's runtime group reads the shared option
        assert cfg.runtime.cpu_threads == 3 and instantiate(cfg.runtime).cpu_threads == 3


def test_auto_threads_is_one_for_small_models_and_the_usable_cores_per_process_for_large_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    small, large = nn.Linear(40, 100), nn.Linear(1000, threads.SMALL_MODEL_PARAMETERS // 1000)
    assert threads.choose_cpu_threads("auto", [small]) == 1
    assert threads.choose_cpu_threads("auto", [small, large]) == 8  # the largest model decides
    assert threads.choose_cpu_threads("auto", [large], processes=2) == 4
    assert threads.choose_cpu_threads("auto", [large], processes=16) == 1
    assert threads.choose_cpu_threads(3, [small]) == 3 and threads.choose_cpu_threads(None, [small]) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "5")  # the user already chose: torch's own setting stands
    assert threads.choose_cpu_threads("auto", [large]) is None


def test_set_cpu_threads_applies_the_choice_and_refuses_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert threads.set_cpu_threads("auto", [nn.Linear(4, 4)], "cpu_threads") == 1 == torch.get_num_threads()
        assert threads.set_cpu_threads(2, [], "cpu_threads") == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    for bad in (0, -1, "many", 1.5, True):
        with pytest.raises(ConfigError, match=r"cpu_threads=.*auto"):
            threads.set_cpu_threads(bad, [], "cpu_threads")


def test_every_spelling_of_trainer_devices_counts_its_processes() -> None:
    from kd_lightning.engine.checks import process_count

    assert [process_count(d) for d in (4, "4", "0,1,2", [0, 1], (0,), -1, "auto", None, True)] == [
        4, 4, 3, 2, 1, None, None, None, None,
    ]  # fmt: skip
