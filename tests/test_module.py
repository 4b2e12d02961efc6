"""DistillationModule invariants: frozen teacher, student-only gradients, checkpoints, resume."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import AlphaWarmup, FrozenTeacherGuard
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from tests.conftest import tiny_trainer

NUM_CLASSES = 3


def teacher_net() -> nn.Module:
    """Has BatchNorm and Dropout, so a wrong train/eval mode changes its outputs."""
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, NUM_CLASSES))


def make_module(alpha: float = 0.9, teacher: nn.Module | None = None, **kwargs) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES)),
        teacher=teacher if teacher is not None else (teacher_net() if alpha > 0 else None),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=alpha, temperature=4.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=NUM_CLASSES,
        **kwargs,
    )


def loader(n: int = 64) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()), batch_size=16)


def trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(default_root_dir=tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[FrozenTeacherGuard()])
    return tiny_trainer(**{**options, **kwargs})


def test_gradients_reach_the_student_only() -> None:
    module = make_module()
    x, y = next(iter(loader()))
    module.training_step((x, y), 0).backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())


def test_optimizer_holds_student_parameters_only() -> None:
    module = make_module()
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in module.student.parameters()}


def test_teacher_stays_eval_and_frozen_through_fit_validate_and_train_calls(tmp_path: Path) -> None:
    module = make_module()
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    run = trainer(tmp_path)
    run.fit(module, loader(), loader())
    assert not any(m.training for m in module.teacher.modules())
    run.validate(module, loader(), verbose=False)
    module.train()
    assert module.student.training and not any(m.training for m in module.teacher.modules())
    for name, value in module.teacher.state_dict().items():  # BatchNorm running stats untouched
        assert torch.equal(value, teacher_before[name]), name


def test_alpha_zero_never_runs_the_teacher(tmp_path: Path) -> None:
    class Exploding(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("teacher ran")

    with pytest.raises(ConfigError, match=r"^loss\.alpha=0 distils nothing .* method=supervised"):
        make_module(alpha=0.0, teacher=Exploding())  # configured so, it is method=supervised: refused
    module = make_module(alpha=0.5, teacher=Exploding())
    module.loss.alpha = 0.0  # set to 0 while training (a schedule): the teacher still never runs
    module.validation_step = lambda batch, idx: None  # validation legitimately compares with the teacher
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(module, loader())


def test_supervised_module_without_teacher_trains(tmp_path: Path) -> None:
    module = make_module(alpha=0.0)
    assert module.teacher is None
    trainer(tmp_path, max_epochs=1).fit(module, loader(), loader())
    assert 0.0 <= float(module.val_acc_best.compute()) <= 1.0


def test_checkpoint_leaves_teacher_out_by_default_and_resume_keeps_it_frozen(tmp_path: Path) -> None:
    module = make_module()
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module, loader(), loader())
    path = tmp_path / "one.ckpt"
    run.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(name.startswith("teacher.") for name in state)
    assert any(name.startswith("student.") for name in state)

    resumed = make_module()
    teacher_weights = {k: v.clone() for k, v in resumed.teacher.state_dict().items()}
    trainer(tmp_path, max_epochs=2).fit(resumed, loader(), loader(), ckpt_path=path)
    assert not any(m.training for m in resumed.teacher.modules())
    assert not any(p.requires_grad for p in resumed.teacher.parameters())
    for name, value in resumed.teacher.state_dict().items():
        assert torch.equal(value, teacher_weights[name])


def test_save_teacher_flag_keeps_teacher_in_checkpoint(tmp_path: Path) -> None:
    module = make_module(save_teacher=True)
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module, loader())
    run.save_checkpoint(tmp_path / "with_teacher.ckpt")
    state = torch.load(tmp_path / "with_teacher.ckpt", weights_only=True)["state_dict"]
    assert any(name.startswith("teacher.") for name in state)


def test_guard_fails_loudly_on_a_teacher_switched_to_train_mode(tmp_path: Path) -> None:
    class SneakyTrainMode(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
            pl_module.teacher.requires_grad_(True)

    module = make_module()
    with pytest.raises(RuntimeError, match="teacher parameters require grad"):
        trainer(tmp_path, callbacks=[SneakyTrainMode(), FrozenTeacherGuard()]).fit(module, loader(), loader())


def test_metrics_are_logged(tmp_path: Path) -> None:
    module = make_module()
    run = trainer(tmp_path, max_epochs=1)
    run.fit(module, loader(), loader())
    for key in (
        "train/loss",
        "train/loss_ce",
        "train/loss_kd",
        "val/acc",
        "val/acc_best",
        "val/agreement",
        "val/kl_to_teacher",
        "teacher/val_acc",
    ):
        assert key in run.callback_metrics, key
    run.test(module, loader(), verbose=False)
    assert {"test/acc", "teacher/test_acc"} <= set(run.callback_metrics)


def test_alpha_warmup_ramps_linearly(tmp_path: Path) -> None:
    seen = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
            seen.append(pl_module.loss.alpha)

    module = make_module(alpha=0.8)
    trainer(tmp_path, max_epochs=5, callbacks=[AlphaWarmup(epochs=4), Record()]).fit(module, loader())
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8])


def test_term_warmup_ramps_the_distillation_weights_and_leaves_the_task_weight(tmp_path: Path) -> None:
    from kd_lightning.callbacks import TermWarmup

    seen = []

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
            seen.append((pl_module.loss.alpha, dict(pl_module.loss.weights)))

    module = make_module(alpha=0.5)
    module.loss = DistillationLoss({"kd": KLDivergence(), "b": KLDivergence()}, alpha=0.5, weights={"kd": 8.0})
    trainer(tmp_path, max_epochs=3, callbacks=[TermWarmup(epochs=2), Record()]).fit(module, loader())
    assert seen == [(0.5, {"kd": 4.0, "b": 0.5}), (0.5, {"kd": 8.0, "b": 1.0}), (0.5, {"kd": 8.0, "b": 1.0})]


def test_loss_scale_states_a_published_weighted_sum_exactly() -> None:
    """``lambda * CE + beta * L_kd`` is alpha = 1/2, scale = 2 lambda, weight = beta / lambda."""
    torch.manual_seed(0)
    student, teacher, y = torch.randn(8, 5), torch.randn(8, 5), torch.randint(0, 5, (8,))
    outputs = {"student": {"logits": student}, "teacher": {"logits": teacher}}
    parts = DistillationLoss({"kd": KLDivergence()}, alpha=0.5, temperature=4.0)(outputs, y).parts
    scaled = DistillationLoss({"kd": KLDivergence()}, alpha=0.5, temperature=4.0, weights={"kd": 8.0}, scale=2.0)
    torch.testing.assert_close(scaled(outputs, y).total, parts["ce"] + 8.0 * parts["kd"])
    with pytest.raises(ConfigError, match=r"loss\.scale=0"):
        DistillationLoss({"kd": KLDivergence()}, scale=0)
