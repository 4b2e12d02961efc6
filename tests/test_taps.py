"""Taps, adapters and their integration in DistillationModule, on models the library did not define."""

from __future__ import annotations

import pickle
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.engine.adapters import connector
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.taps import Taps
from kd_lightning.losses import SP, VID, AttentionTransfer, DistillationLoss, FitNets, KLDivergence
from kd_lightning.methods.kd import DistillationModule


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.mlp = nn.Sequential(nn.ReLU(), nn.Conv1d(width, width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.conv(x))


class Net(nn.Module):
    """A small custom model: stem -> blocks -> pooled linear head."""

    def __init__(self, width: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv1d(1, width, 3, padding=1)
        self.blocks = nn.Sequential(Block(width), Block(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(-1))


X = torch.randn(5, 1, 12)


def test_captures_nested_outputs_only_inside_capture() -> None:
    net = Net()
    taps = Taps(net, {"blocks.1.mlp": "key", "stem": "key2"})
    with taps.capture() as captured:
        net(X)
    assert torch.equal(captured["stem"], net.stem(X))
    assert torch.equal(captured["blocks.1.mlp"], net.blocks[1].mlp(net.blocks[1].conv(net.blocks[0](net.stem(X)))))
    net(X * 2)  # outside capture: nothing is recorded anywhere
    assert torch.equal(captured["stem"], net.stem(X))


def test_remove_detaches_every_hook() -> None:
    net = Net()
    taps = Taps(net, {"blocks.0": "k", "head": "k"})
    assert len(taps) == 2
    taps.remove()
    assert len(taps) == 0 and all(not m._forward_hooks for m in net.modules())


def test_wrong_path_names_the_key_and_the_nearest_modules() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.fitnet\.student_layer='blocks\.1\.mpl'.*'blocks\.1\.mlp'"):
        Taps(Net(), {"blocks.1.mpl": "loss.terms.fitnet.student_layer"})


@pytest.mark.parametrize(
    ("student", "teacher", "kind"),
    [
        ((2, 8), (2, 16), nn.Linear),
        ((2, 8, 40), (2, 64, 40), nn.Sequential),
        ((2, 3, 4, 4), (2, 6, 4, 4), nn.Sequential),
    ],
)
def test_connector_maps_student_to_teacher_shape(student: tuple, teacher: tuple, kind: type) -> None:
    adapter = connector(torch.randn(student), torch.randn(teacher), "k")
    assert isinstance(adapter, kind) and adapter(torch.randn(student)).shape == teacher


@pytest.mark.parametrize(("student", "teacher"), [((2, 8, 40), (2, 16)), ((2, 8, 40), (2, 8, 20))])
def test_connector_refuses_unbridgeable_shapes(student: tuple, teacher: tuple) -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.fitnet: no adapter"):
        connector(torch.randn(student), torch.randn(teacher), "loss.terms.fitnet")


def module_with(terms: dict, alpha: float = 0.5, teacher: nn.Module | None = None) -> DistillationModule:
    torch.manual_seed(0)
    return DistillationModule(
        student=Net(width=4),
        teacher=teacher or Net(width=8),
        loss=DistillationLoss(terms, alpha=alpha),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
    )


def test_module_routes_layers_and_teacher_taps_run_without_grad() -> None:
    module = module_with({"sp": SP(student_layer="blocks.1", teacher_layer="blocks.0.mlp")})
    student, teacher = module.student_outputs(X), module.teacher_outputs(X)
    assert set(student) == {"logits", "blocks.1"} and set(teacher) == {"logits", "blocks.0.mlp"}
    assert student["blocks.1"].requires_grad and not teacher["blocks.0.mlp"].requires_grad
    module.training_step((X, torch.tensor([0, 1, 2, 0, 1])), 0).backward()
    assert all(p.grad is not None for p in module.student.parameters())


def test_wrong_layer_fails_when_the_module_is_built() -> None:
    with pytest.raises(ConfigError, match=r"loss\.terms\.sp\.teacher_layer='blocks\.3'"):
        module_with({"sp": SP(student_layer="blocks.1", teacher_layer="blocks.3")})


def test_fitnet_regressor_is_sized_trained_and_checkpointed() -> None:
    module = module_with({"fitnet": FitNets(student_layer="blocks.1", teacher_layer="blocks.1")})
    module.setup_for(X)
    regressor = module.loss.terms["fitnet"].regressor
    assert isinstance(regressor[0], nn.Conv1d) and (regressor[0].in_channels, regressor[0].out_channels) == (4, 8)
    in_optimizer = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in regressor.parameters()} <= in_optimizer
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    names = checkpoint["state_dict"]
    assert "loss.terms.fitnet.regressor.0.weight" in names and not any(n.startswith("teacher.") for n in names)


def test_unbridgeable_layers_fail_at_setup_naming_the_loss_key() -> None:
    module = module_with({"at": AttentionTransfer(student_layer="blocks.1", teacher_layer="head")})
    with pytest.raises(ConfigError, match=r"^loss\.terms\.at: attention transfer needs conv maps"):
        module.setup_for(X)


class Exploding(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the teacher must not run")


def test_alpha_zero_never_runs_the_teacher_with_layer_terms() -> None:
    module = module_with({"fitnet": FitNets(student_layer="blocks.1", teacher_layer="blocks.1")}, 0.5, Exploding())
    module.loss.alpha = 0.0  # a schedule's 0 (configured as 0, method=kd is refused: tests/test_module.py)
    module.setup_for(X)
    assert module.loss.terms["fitnet"].regressor is None
    module.training_step((X, torch.tensor([0, 1, 2, 0, 1])), 0).backward()


def test_logit_only_loss_installs_no_hooks() -> None:
    module = module_with({"kd": KLDivergence()})
    assert len(module.student_taps) == 0 and not any(m._forward_hooks for m in module.teacher.modules())


def test_module_with_taps_pickles_for_ddp_spawn() -> None:
    module = module_with({"sp": SP(student_layer="blocks.1", teacher_layer="blocks.0.mlp")})
    copy = pickle.loads(pickle.dumps(module))
    assert set(copy.student_outputs(X)) == {"logits", "blocks.1"}
    assert set(copy.teacher_outputs(X)) == {"logits", "blocks.0.mlp"}


def test_vid_regressor_and_variances_are_trainable_after_setup() -> None:
    module = module_with({"vid": VID(student_layer="blocks.1", teacher_layer="blocks.1")})
    with pytest.raises(RuntimeError, match="before its adapters were sized"):
        module.loss.terms["vid"](torch.randn(5, 4, 12), torch.randn(5, 8, 12))
    module.setup_for(X)
    term = module.loss.terms["vid"]
    trainable = {id(p) for p in module.trainable_parameters()}
    assert {id(p) for p in term.parameters()} <= trainable and term.raw_variance.shape == (8,)
    module.training_step((X, torch.tensor([0, 1, 2, 0, 1])), 0).backward()
    assert term.raw_variance.grad is not None


def test_fitnet_needs_an_example_batch_and_resumes_with_its_regressor(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.randn(16, 1, 12), torch.randint(0, 3, (16,))), batch_size=8)
    options = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)

    def fitnet_module() -> DistillationModule:
        return module_with({"fitnet": FitNets(student_layer="blocks.1", teacher_layer="blocks.1")})

    with pytest.raises(ConfigError, match=r"loss\.terms \['fitnet'\] size adapters"):
        L.Trainer(max_epochs=1, default_root_dir=tmp_path / "a", **options).fit(fitnet_module(), data)
    module = fitnet_module()
    module.setup_for(X)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path / "b", **options)
    trainer.fit(module, data)
    path = tmp_path / "fitnet.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["state_dict"]["loss.terms.fitnet.regressor.0.weight"]
    resumed = fitnet_module()
    resumed.setup_for(X)
    L.Trainer(max_epochs=1, default_root_dir=tmp_path / "c", **options).fit(resumed, data, ckpt_path=path)
    assert torch.equal(resumed.loss.terms["fitnet"].regressor[0].weight, saved)
