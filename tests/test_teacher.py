"""Teacher weights from .ckpt / .pt / .pth / .safetensors, with one-line errors for bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.weights import freeze, load_weights
from kd_lightning.models import MLP


def reference() -> nn.Module:
    torch.manual_seed(3)
    return MLP(num_classes=4, in_features=6, hidden=8)


def assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=False):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_plain_state_dict(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"teacher{suffix}"
    torch.save(reference().state_dict(), path)
    assert_same(load_weights(MLP(num_classes=4, in_features=6, hidden=8), path), reference())


def test_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "teacher.safetensors"
    save_file(reference().state_dict(), str(path))
    assert_same(load_weights(MLP(num_classes=4, in_features=6, hidden=8), path), reference())


def test_lightning_checkpoint_with_student_prefix(tmp_path: Path) -> None:
    path = tmp_path / "run.ckpt"
    state = {f"student.{k}": v for k, v in reference().state_dict().items()}
    state["val_acc_best.max_val"] = torch.tensor(0.5)
    torch.save({"state_dict": state, "epoch": 3}, path)
    assert_same(load_weights(MLP(num_classes=4, in_features=6, hidden=8), path), reference())


def test_missing_file_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teacher.checkpoint=.*does not exist"):
        load_weights(reference(), tmp_path / "nope.ckpt")


def test_wrong_architecture_names_the_key_and_the_keys(tmp_path: Path) -> None:
    path = tmp_path / "wide.pt"
    torch.save(MLP(num_classes=4, in_features=6, hidden=16).state_dict(), path)
    with pytest.raises(ConfigError, match=r"teacher.checkpoint=.*does not fit.*shape differs"):
        load_weights(reference(), path)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    with path.open("wb") as handle:
        pickle.dump({"weight": object()}, handle)
    with pytest.raises(ConfigError, match="could not be read"):
        load_weights(reference(), path)


def test_unknown_format(tmp_path: Path) -> None:
    path = tmp_path / "teacher.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown format"):
        load_weights(reference(), path)


def test_freeze() -> None:
    model = freeze(reference().train())
    assert not model.training and not any(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_in_mode_restores_the_models_mode_also_when_the_block_raises(training: bool) -> None:
    from kd_lightning.engine.weights import in_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train(training)
    with in_mode(model) as inside:
        assert inside is model and not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError, match="boom"), in_mode(model, training=not training):
        assert model.training is not training
        raise RuntimeError("boom")
    assert model.training is training and model[1].training is training
