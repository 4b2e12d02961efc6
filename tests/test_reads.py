"""Terms read outputs by model name, layer and io; taps of inputs and of reused modules; one owner per
temperature; every frozen model guarded and kept out of checkpoints."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import FrozenTeacherGuard, TemperatureAnneal
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.taps import Taps
from kd_lightning.losses import DKD, DistillationLoss, FitNets, KLDivergence
from kd_lightning.losses.reads import Read
from kd_lightning.methods import DistillationModule
from tests.conftest import compose_config, tiny_trainer
from tests.test_taps import Net

X = torch.randn(5, 1, 12)


def module_with(terms: dict, teachers: dict | None = None, **kwargs) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=Net(width=4),
        teachers=teachers or {"teacher": Net(width=6)},
        loss=DistillationLoss(terms, alpha=0.5, **kwargs),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
    )


def test_a_layer_input_is_read_through_a_pre_hook() -> None:
    net = Net(width=6)
    taps = Taps(net, {"head:input": "loss.terms.x.teacher.layer"})
    with taps.capture() as captured:
        net(X)
    assert torch.equal(captured["head:input"], net.blocks(net.stem(X)).mean(-1))  # the penultimate features


def test_terms_read_penultimate_features_of_any_model_by_name() -> None:
    term = FitNets(
        student={"layer": "head", "io": "input"}, teacher={"model": "teacher", "layer": "head", "io": "input"}
    )
    module = module_with({"fitnet": term})
    module.setup_for(X)
    teacher = module.teacher_outputs(X)
    assert set(teacher) == {"logits", "head:input"} and teacher["head:input"].shape == (5, 6)
    assert module.loss.layers("student") == {"head:input": "loss.terms.fitnet.student.layer"}
    out = module.training_step((X, torch.zeros(5, dtype=torch.long)), 0)
    assert torch.isfinite(out)


def test_a_term_can_read_a_second_teacher() -> None:
    terms = {"kd": KLDivergence(), "kd_1": KLDivergence(teacher={"model": "teacher_1"})}
    calls: list[str] = []
    teachers = {"teacher": Net(width=6), "teacher_1": Net(width=5)}
    for name, net in teachers.items():
        net.register_forward_hook(lambda *_, name=name: calls.append(name))
    module = module_with(terms, teachers)
    loss = module.training_step((X, torch.zeros(5, dtype=torch.long)), 0)
    assert sorted(calls) == ["teacher", "teacher_1"] and torch.isfinite(loss)
    assert module.loss.models_read == {"student", "teacher", "teacher_1"}


def test_a_term_reading_a_model_the_method_lacks_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.kd\.teacher reads model 'teacher_9'"):
        module_with({"kd": KLDivergence(teacher={"model": "teacher_9"})})


def test_bad_reads_name_their_key() -> None:
    with pytest.raises(ConfigError, match="io='inside'"):
        Read("teacher", "fc", "inside", "teacher.io")
    with pytest.raises(ConfigError, match="logits have no input"):
        FitNets(student={"io": "input"})
    with pytest.raises(ConfigError, match="both name a layer"):
        FitNets(student_layer="stem", student={"layer": "head"})
    with pytest.raises(ConfigError, match="unknown keys"):
        KLDivergence(teacher={"modle": "teacher_1"})


def test_a_module_run_twice_in_one_forward_is_refused_with_its_path() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.act(self.a(self.act(x))))

    net = Shared()
    taps = Taps(net, {"act": "loss.terms.fitnet.student_layer"})
    with (
        pytest.raises(ConfigError, match=r"^loss\.terms\.fitnet\.student_layer='act' runs more than once"),
        taps.capture(),
    ):
        net(torch.randn(2, 4))
    once = Taps(net, {"a": "loss.terms.fitnet.student_layer"})  # a module that runs once is fine
    x = torch.randn(2, 4)
    with once.capture() as captured:
        net(x)
    assert torch.equal(captured["a"], net.a(net.act(x)))


def test_per_term_temperatures_hold_and_only_shared_ones_follow_the_loss() -> None:
    loss = DistillationLoss({"kd": KLDivergence(temperature=4.0), "dkd": DKD(), "kd_shared": KLDivergence()}, 0.5, 2.0)
    assert (loss.terms["kd"].temperature, loss.terms["dkd"].temperature, loss.terms["kd_shared"].temperature) == (
        4.0,
        2.0,
        2.0,
    )
    loss.temperature = 8.0  # what temperature schedules and sweeps set
    assert (loss.terms["kd"].temperature, loss.terms["dkd"].temperature) == (4.0, 8.0)
    with pytest.raises(ConfigError, match="temperature=0"):
        KLDivergence(temperature=0)


def test_a_term_temperature_override_from_the_command_line_is_used_and_recorded(tmp_path: Path) -> None:
    from hydra.utils import instantiate

    cfg = compose_config(tmp_path, ["loss.terms.kd.temperature=1", "loss.temperature=4"])
    loss = instantiate(cfg.loss)
    assert loss.terms["kd"].temperature == 1.0 and cfg.loss.terms.kd.temperature == 1
    schedule = TemperatureAnneal(start=8.0, epochs=2)
    schedule._target = loss.temperature
    loss.temperature = schedule.value_at(0, 4.0)
    assert loss.terms["kd"].temperature == 1.0  # its own T is not annealed


def test_guard_and_checkpoints_cover_every_frozen_model(tmp_path: Path) -> None:
    terms = {"kd": KLDivergence(), "kd_1": KLDivergence(teacher={"model": "teacher_1"})}
    module = module_with(terms, {"teacher": Net(width=6), "teacher_1": Net(width=5)})
    data = DataLoader(TensorDataset(torch.randn(20, 1, 12), torch.randint(3, (20,))), batch_size=10)
    trainer = tiny_trainer(
        max_epochs=1,
        callbacks=[FrozenTeacherGuard()],
        default_root_dir=tmp_path,
        enable_checkpointing=True,
    )
    trainer.fit(module, data, data)
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert not any(name.startswith(("teacher.", "teacher_1.")) for name in state)
    assert any(name.startswith("student.") for name in state)
    module.teacher_1.train()
    with pytest.raises(RuntimeError, match="teacher_1 modules in train mode"):
        FrozenTeacherGuard._check(trainer, module, "now")
