"""A teacher whose weights the user supplies (``model.path`` / ``model.weights`` files) is used as given, not
trained again behind their back; a fit asked for explicitly (``teacher.fine_tune=true``) still runs, and every
cache built from such files is keyed on their bytes, not their names."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf, open_dict
from safetensors.torch import save_file

from kd_lightning.engine.caching.store import path_digest
from kd_lightning.engine.weights import load_weights
from kd_lightning.models import ConvNet1D
from kd_lightning.recipes.teacher import file_key, obtain_teacher
from tests.conftest import TINY, compose_config


def tiny_cnn(weights: str | None = None, **kwargs) -> ConvNet1D:
    """A 1-D CNN whose weights come from the user's file (as timm / torchvision / Hugging Face factories do)."""
    model = ConvNet1D(**kwargs)
    if weights is not None:
        load_weights(model, weights, key="teacher.model.weights")
    return model


def user_teacher(tmp_path: Path, kd_home: Path, **extra) -> tuple:
    """A config, a teacher config whose model names a weights file the user saved, and the model."""
    cfg = compose_config(tmp_path / "run", [*TINY, "teacher.fit.max_epochs=1", "data.transfer_samples=0"])
    model = ConvNet1D(num_classes=10, channels=8, depth=2)
    weights = tmp_path / "my_teacher.safetensors"
    save_file({name: t.contiguous() for name, t in model.state_dict().items()}, str(weights))
    teacher_cfg = cfg.teacher.copy()
    with open_dict(teacher_cfg):
        teacher_cfg.model = OmegaConf.create({"_target_": "tests.test_user_weights.tiny_cnn", "weights": str(weights)})
        teacher_cfg.model.update({"num_classes": 10, "channels": 8, "depth": 2})
        teacher_cfg.update(extra)
    return cfg, teacher_cfg, model, weights


def test_supplied_weights_are_used_as_given_not_refitted(tmp_path: Path, kd_home: Path) -> None:
    cfg, teacher_cfg, model, _ = user_teacher(tmp_path, kd_home)
    assert teacher_cfg.fit  # the group's fit recipe is still there, as a user of teacher=hf_text would have it
    before = {name: t.clone() for name, t in model.state_dict().items()}
    provenance = obtain_teacher(cfg, teacher_cfg, "teacher", model, tmp_path / "run")
    assert provenance.source.startswith("as given: teacher.model.weights=") and provenance.fit_seconds == 0
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_a_fine_tune_asked_for_runs_and_its_cache_follows_the_files_bytes(tmp_path: Path, kd_home: Path) -> None:
    cfg, teacher_cfg, model, weights = user_teacher(tmp_path, kd_home, fine_tune=True)
    first = obtain_teacher(cfg, teacher_cfg, "teacher", model, tmp_path / "run")
    assert first.source.startswith("trained")
    again = obtain_teacher(cfg, teacher_cfg, "teacher", ConvNet1D(num_classes=10, channels=8, depth=2), tmp_path / "b")
    assert again.source.startswith("cache")
    # the same file name with other bytes (the user replaced the weights): not the cached teacher
    replaced = {name: t + 1.0 for name, t in ConvNet1D(num_classes=10, channels=8, depth=2).state_dict().items()}
    save_file({name: t.contiguous() for name, t in replaced.items()}, str(weights))
    other = obtain_teacher(cfg, teacher_cfg, "teacher", ConvNet1D(num_classes=10, channels=8, depth=2), tmp_path / "c")
    assert other.source.startswith("trained")


def test_directory_digests_cover_every_files_bytes(tmp_path: Path) -> None:
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "config.json").write_text('{"a": 1}')
    (folder / "model.safetensors").write_bytes(b"\0" * 64)
    first = path_digest(folder)
    assert path_digest(folder) == first
    (folder / "model.safetensors").write_bytes(b"\1" * 64)
    assert path_digest(folder) != first
    node = OmegaConf.create({"_target_": "x", "path": str(folder)})
    assert file_key(node) == {"files": {"path": path_digest(folder)}}
    assert file_key(OmegaConf.create({"_target_": "x", "path": None})) == {}  # keys of other models unchanged
