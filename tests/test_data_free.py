"""method=data_free: the generator learns through the frozen teacher, the student from generated inputs
only; the configured training data is never read."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods import DataFreeDistillation
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.recipes.distill import distill
from tests.conftest import compose_config, tiny_trainer

LENGTH, CLASSES = 8, 3
#: A data-free run on MNIST-1D in seconds: an untrained BN teacher used as built, no scratch baseline.
QUICK = [
    "method=data_free",
    "teacher=cnn1d_bn",
    "trainer.max_epochs=1",
    "method.steps_per_epoch=3",
    "method.batch_size=32",
    "method.student_steps=1",
    "compare_scratch=false",
    "logger=none",
    "+trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def bn_teacher() -> nn.Module:
    """A tiny BN teacher whose running statistics are not the defaults (a few train-mode forwards)."""
    teacher = ConvNet1D(CLASSES, channels=4, depth=2, kernel_size=3, length=LENGTH, batch_norm=True)
    with torch.no_grad():
        for _ in range(3):
            teacher(torch.randn(64, 1, LENGTH) * 2 + 1)
    return teacher


def method(teacher: nn.Module | None = None, **options) -> DataFreeDistillation:
    torch.manual_seed(0)
    module = DataFreeDistillation(
        student=MLP(CLASSES, in_features=LENGTH, hidden=8),
        teacher=teacher if teacher is not None else bn_teacher(),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=1.0, temperature=4.0),
        optimizer=partial(torch.optim.Adam, lr=1e-2),
        num_classes=CLASSES,
        **{"batch_size": 16, "steps_per_epoch": 3, "student_steps": 2, **options},
    )
    module.build_generator(torch.zeros(2, 1, LENGTH))
    return module


class EvalOnly(L.LightningDataModule):
    """Validation and test batches; asking for its training loader fails the test."""

    def __init__(self) -> None:
        super().__init__()
        data = TensorDataset(torch.randn(32, 1, LENGTH), torch.randint(CLASSES, (32,)))
        self.loader = DataLoader(data, batch_size=16)

    def train_dataloader(self) -> DataLoader:
        raise AssertionError("the training data was read")

    def val_dataloader(self) -> DataLoader:
        return self.loader

    def test_dataloader(self) -> DataLoader:
        return self.loader


def fit(module: DataFreeDistillation, tmp_path: Path) -> L.Trainer:
    trainer = tiny_trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=module.training_data(EvalOnly()))
    return trainer


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_batch_norm_option_leaves_the_plain_cnn_as_it_was() -> None:
    plain = ConvNet1D(depth=3)
    keys = {f"features.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")} | {"head.weight", "head.bias"}
    assert set(plain.state_dict()) == keys
    bn = ConvNet1D(depth=3, batch_norm=True)
    assert [type(m).__name__ for m in bn.features] == ["Conv1d", "BatchNorm1d", "ReLU"] * 3
    assert bn(torch.randn(2, 1, 40)).shape == (2, 10)


def test_generator_gradients_flow_through_the_frozen_teacher_only_to_the_generator() -> None:
    module = method(bn_weight=1.0, ce_weight=0.0, adv_weight=0.0)  # the BatchNorm prior alone: only the teacher
    x, y = module.generate(16)
    total, parts, _ = module.generator_loss(x, y)
    assert parts["bn"] > 0 and torch.equal(total, parts["bn"])
    total.backward()
    grads = [p.grad for p in module.generator.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    assert all(p.grad is None for p in module.student.parameters())  # the student was not in this loss


def test_each_step_updates_only_its_own_model_and_the_teacher_stays_bit_identical(tmp_path: Path) -> None:
    module = method()
    teacher = snapshot(module.teacher)
    log: list[tuple[str, bool, bool, bool]] = []
    steps = {"generator": module.generator_step, "student": module.student_step}

    def traced(name: str, optimizer) -> None:
        generator = {n: p.detach().clone() for n, p in module.generator.named_parameters()}
        student = {n: p.detach().clone() for n, p in module.student.named_parameters()}
        grads = [None if p.grad is None else p.grad.clone() for p in module.generator.parameters()]
        steps[name](optimizer)
        student_moved = any(not torch.equal(p, student[n]) for n, p in module.student.named_parameters())
        generator_moved = any(not torch.equal(p, generator[n]) for n, p in module.generator.named_parameters())
        grads_touched = any(
            (g is None) != (p.grad is None) or (g is not None and not torch.equal(g, p.grad))
            for g, p in zip(grads, module.generator.parameters(), strict=True)
        )
        log.append((name, generator_moved, student_moved, grads_touched))

    module.generator_step = partial(traced, "generator")
    module.student_step = partial(traced, "student")
    fit(module, tmp_path)
    assert [entry[0] for entry in log] == ["generator", "student", "student"] * 3
    assert all(entry[1:] == (True, False, True) for entry in log if entry[0] == "generator")
    assert all(entry[1:] == (False, True, False) for entry in log if entry[0] == "student")  # x was detached
    assert same(snapshot(module.teacher), teacher)  # weights and BatchNorm running statistics
    assert all(p.grad is None for p in module.teacher.parameters())


def test_a_teacher_without_batch_norm_and_a_teacher_cache_are_refused() -> None:
    plain = ConvNet1D(CLASSES, channels=4, depth=2, kernel_size=3, length=LENGTH)
    with pytest.raises(ConfigError, match=r"teacher ConvNet1D has no BatchNorm.*teacher=cnn1d_bn.*method\.bn_weight=0"):
        method(plain)
    method(plain, bn_weight=0.0)  # the fix it names works
    loss = DistillationLoss({"kd": KLDivergence()}, alpha=1.0)
    with pytest.raises(ConfigError, match=r"teacher_cache=none"):
        DataFreeDistillation.check_config(loss, {"student": nn.Linear(1, 1), "teacher": bn_teacher()}, True)
    with pytest.raises(ConfigError, match=r"exactly one teacher"):
        DataFreeDistillation(
            student=nn.Linear(LENGTH, CLASSES),
            teachers={"teacher": bn_teacher(), "teacher_1": bn_teacher()},
            loss=DistillationLoss({"kd": KLDivergence(), "kd_1": KLDivergence(teacher={"model": "teacher_1"})}),
            optimizer=partial(torch.optim.Adam, lr=1e-2),
            num_classes=CLASSES,
        )
    with pytest.raises(ConfigError, match=r"loss\.alpha > 0"):
        DataFreeDistillation.check_config(DistillationLoss({"kd": KLDivergence()}, alpha=0.0), {"teacher": 1}, False)


def test_recipe_refuses_the_teacher_cache_before_any_training(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*QUICK, "teacher_cache=memory"])
    with pytest.raises(ConfigError, match=r"^method=data_free generates new inputs .*teacher_cache=none"):
        distill(cfg)
    assert not (tmp_path / "run" / "teacher").exists()


def test_a_full_run_never_reads_the_training_data(
    tmp_path: Path, kd_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self) -> None:
        raise AssertionError("the configured training data was read")

    monkeypatch.setattr(MNIST1DDataModule, "train_dataloader", refuse)
    summary = distill(compose_config(tmp_path / "run", [*QUICK, "teacher.fit=null"]))
    metrics = summary["metrics"]
    for key in ("test/acc", "val/acc", "val/agreement", "teacher/test_acc", "train/loss_kd", "train/loss_generator"):
        assert key in metrics, key
    assert "train/loss_ce" not in metrics  # no labels: the task term never acts
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert any(k.startswith("generator.") for k in state["state_dict"])
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    assert len(state["optimizer_states"]) == 2
    assert state["global_step"] == 6  # a generator and a student step per batch


def test_resume_from_last_continues_with_generator_and_optimizers(tmp_path: Path, kd_home: Path) -> None:
    run = tmp_path / "run"
    distill(compose_config(run, [*QUICK, "teacher.fit=null"]))
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    distill(compose_config(run, [*QUICK, "teacher.fit=null", "trainer.max_epochs=2", "ckpt_path=last"]))
    second = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert first["global_step"] == 6 and second["global_step"] == 12  # one more epoch of 3 x (generator, student)
    generator = [k for k in first["state_dict"] if k.startswith("generator.") and k.endswith("weight")]
    assert generator and not all(torch.equal(first["state_dict"][k], second["state_dict"][k]) for k in generator)
    steps = [s["state"][0]["step"] for s in second["optimizer_states"]]
    assert [float(s) for s in steps] == [6.0, 6.0]  # both Adam states went on from the checkpoint


def test_a_run_that_crashed_resumes_to_exactly_the_uninterrupted_run(tmp_path: Path, kd_home: Path) -> None:
    common = [*QUICK, "teacher.fit=null", "trainer.max_epochs=3", "trainer.deterministic=true"]
    whole = distill(compose_config(tmp_path / "whole", common))
    fail = ["+callbacks.fail._target_=tests.custom_callbacks.FailInRunDir", "+callbacks.fail.run_dir=crashed"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        distill(compose_config(tmp_path / "crashed", [*common, *fail, "+callbacks.fail.epoch=2"]))
    resumed = distill(compose_config(tmp_path / "crashed", [*common, "ckpt_path=last"]))
    for key in ("val/acc_best", "test/acc", "test/acc_last", "train/loss", "train/loss_generator"):
        assert resumed["metrics"][key] == whole["metrics"][key], key
    states = [torch.load(Path(r["best_checkpoint"]), weights_only=True)["state_dict"] for r in (whole, resumed)]
    assert same(states[0], states[1]) and any(k.startswith("generator.") for k in states[0])


@pytest.mark.slow
def test_a_few_hundred_steps_lift_the_student_well_above_chance(tmp_path: Path, kd_home: Path) -> None:
    common = [o for o in QUICK if not o.startswith(("method.", "trainer.max_epochs"))]
    overrides = [*common, "teacher.fit.max_epochs=10", "trainer.max_epochs=4", "method.steps_per_epoch=25"]
    summary = distill(compose_config(tmp_path / "run", overrides))  # 100 generator and 500 student steps
    assert summary["metrics"]["val/acc_best"] > 0.3  # chance: 0.1


def test_recipe_refuses_a_teacher_without_batch_norm_before_training_it(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*QUICK, "teacher=cnn1d", "teacher.fit.max_epochs=50"])
    with pytest.raises(ConfigError, match=r"teacher ConvNet1D has no BatchNorm.*teacher=cnn1d_bn"):
        distill(cfg)
    assert not (tmp_path / "run" / "teacher").exists()  # refused before the teacher's fit


def test_ddp_without_unused_parameter_detection_is_refused_before_training(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*QUICK, "trainer=ddp_spawn", "trainer.devices=2"])
    with pytest.raises(ConfigError, match=r"trainer.strategy=ddp_spawn_find_unused_parameters_true"):
        distill(cfg)
