"""Reliability: run folders are data, non-finite training stops, damaged caches are rebuilt, side work draws
no random numbers, checks come before training, caches key on model code."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_lightning.engine.caching.store import code_digest
from kd_lightning.engine.errors import ConfigError, TrainingDiverged
from kd_lightning.recipes.distill import distill
from kd_lightning.recipes.finished_run import Run
from kd_lightning.reporting.sweep_report import read_jobs
from tests.conftest import TINY, compose_config

QUICK = [*TINY, "compare_scratch=false", "logger=none"]


def test_a_run_folder_cannot_make_kd_report_run_code(tmp_path: Path) -> None:
    run_dir, pwned = tmp_path / "run", tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {}}, run_dir / "checkpoints" / "last.ckpt")
    evil = {"_target_": "os.system", "_args_": [f"touch {pwned}"]}
    config = {"student": {"model": evil}, "data": {"_target_": "kd_lightning.data.MNIST1DDataModule"}}
    (run_dir / "summary.json").write_text(json.dumps({"config": config, "student_params": 1, "metrics": {}}))
    with pytest.raises(ConfigError, match=r"student\.model\._target_=os\.system is not an allow-listed"):
        Run.read(run_dir)
    assert not pwned.exists()
    config["student"]["model"] = {"_target_": "kd_lightning.models.MLP", "act": {"_target_": "builtins.open"}}
    (run_dir / "summary.json").write_text(json.dumps({"config": config, "student_params": 1, "metrics": {}}))
    with pytest.raises(ConfigError, match=r"student\.model\.act\._target_=builtins\.open"):  # nested targets too
        Run.read(run_dir)
    assert Run.read(run_dir, trusted=("kd_lightning.", "builtins.")).checkpoint.name == "last.ckpt"  # explicit opt-in


def test_the_librarys_own_teacher_input_adapters_need_no_allow_target() -> None:
    """A run whose teacher reads its input through one of the library's adapters (teacher.input) is read by
    kd-report / kd-export without --allow-target; a private name in the same module is still refused."""
    from kd_lightning.engine.trusted import check_trusted

    for adapter in ("ImageInput", "TokenInput"):
        check_trusted({"teacher": {"input": {"_target_": f"kd_lightning.teacher_inputs.{adapter}"}}}, "summary.json")
    with pytest.raises(ConfigError, match=r"teacher\.input\._target_=kd_lightning\.teacher_inputs\._private"):
        check_trusted({"teacher": {"input": {"_target_": "kd_lightning.teacher_inputs._private"}}}, "summary.json")


def test_an_exploding_learning_rate_stops_the_run_naming_the_step_and_parts(tmp_path: Path, kd_home: Path) -> None:
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch 0, step \d+ \(non-finite loss parts: .*'ce'"):
        distill(compose_config(tmp_path / "run", [*QUICK, "optimizer.lr=1e30"]))
    assert not (tmp_path / "run" / "summary.json").exists()


def test_skip_mode_skips_and_counts_non_finite_steps(tmp_path: Path, kd_home: Path) -> None:
    summary = distill(compose_config(tmp_path / "run", [*QUICK, "optimizer.lr=1e30", "runtime.nonfinite=skip"]))
    assert summary["metrics"]["train/nonfinite_steps"] > 0


def test_a_nan_teacher_is_named(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "ok", QUICK)
    distill(cfg)
    cached = next((Path(cfg.paths.cache_dir) / "teachers").glob("*/model.safetensors"))
    nan_teacher = {name: torch.full_like(t, float("nan")) for name, t in load_file(cached).items()}
    save_file(nan_teacher, str(tmp_path / "nan.safetensors"))
    with pytest.raises(TrainingDiverged, match=r"non-finite outputs of: \['teacher'\]"):
        distill(compose_config(tmp_path / "nan", [*QUICK, f"teacher.checkpoint={tmp_path / 'nan.safetensors'}"]))


def test_damaged_caches_are_rebuilt_with_a_warning(
    tmp_path: Path, kd_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache_dir = tmp_path / "cache"
    overrides = [*TINY, "logger=none", f"paths.cache_dir={cache_dir}"]
    first = distill(compose_config(tmp_path / "a", overrides))
    weights = next((cache_dir / "teachers").glob("*/model.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-10:] = bytes(10)  # flipped bytes in the tensor data: still a loadable file, wrong weights
    weights.write_bytes(bytes(raw))
    (scratch,) = (cache_dir / "scratch").glob("*.json")
    scratch.write_text(scratch.read_text()[:20])  # a truncated JSON entry
    with caplog.at_level("WARNING"):
        second = distill(compose_config(tmp_path / "b", overrides))
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "cached teacher" in messages and "damaged" in messages and "scratch" in messages
    assert second["teacher_source"].startswith("trained")  # retrained, not the damaged one
    assert second["metrics"]["teacher/test_acc"] == first["metrics"]["teacher/test_acc"]
    assert {k: second["scratch"][k] for k in ("val_acc_best", "test_acc")} == {
        k: first["scratch"][k] for k in ("val_acc_best", "test_acc")
    }  # recomputed (a new fit_seconds), the same result


def test_damaged_generated_data_is_regenerated(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kd_lightning.data import MNIST1DDataModule

    data = MNIST1DDataModule(str(tmp_path), val_samples=50)
    data.prepare_data()
    path = tmp_path / "mnist1d_val_50.npz"
    good = path.read_bytes()
    path.write_bytes(good[:100])
    with caplog.at_level("WARNING"):
        MNIST1DDataModule(str(tmp_path), val_samples=50).prepare_data()
    assert "damaged" in caplog.text and path.read_bytes() == good


def test_a_cache_hit_and_a_miss_train_the_same(tmp_path: Path, kd_home: Path) -> None:
    overrides = [*QUICK, "teacher_cache=disk", f"teacher_cache.directory={tmp_path / 'tables'}"]
    miss = distill(compose_config(tmp_path / "miss", overrides))
    hit = distill(compose_config(tmp_path / "hit", overrides))
    assert miss["metrics"]["train/loss"] == hit["metrics"]["train/loss"]
    assert miss["metrics"]["val/acc"] == hit["metrics"]["val/acc"]


def test_a_wrong_layer_path_fails_before_any_teacher_is_trained(tmp_path: Path, kd_home: Path) -> None:
    fresh = [*QUICK, f"paths.cache_dir={tmp_path / 'empty_cache'}", "loss=fitnet", "student=cnn1d_narrow"]
    with pytest.raises(ConfigError, match=r"^loss\.terms\.fitnet\.teacher_layer='features\.99'"):
        distill(compose_config(tmp_path / "run", [*fresh, "loss.terms.fitnet.teacher_layer=features.99"]))
    assert not (tmp_path / "run" / "teacher").exists() and not (tmp_path / "empty_cache" / "teachers").exists()


def test_editing_a_models_code_changes_its_cache_key(tmp_path: Path) -> None:
    source = "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
    source += "        self.fc = torch.nn.Linear(2, 2)\n    def forward(self, x):\n        return self.fc(x){}\n"

    def load(suffix: str) -> torch.nn.Module:
        path = tmp_path / "user_net.py"
        path.write_text(source.format(suffix))
        spec = importlib.util.spec_from_file_location("user_net", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["user_net"] = module
        spec.loader.exec_module(module)
        return module.Net()

    before = code_digest(load(""))
    assert code_digest(load("")) == before  # the same code: the same key
    assert code_digest(load(" * 2")) != before  # same config, edited forward: another key
    sys.modules.pop("user_net")


def test_one_truncated_summary_does_not_stop_the_sweep_report(tmp_path: Path) -> None:
    for job, text in (("0", json.dumps({"metrics": {"val/acc_best": 0.5}, "config": {}})), ("1", '{"metr')):
        (tmp_path / job / ".hydra").mkdir(parents=True)
        (tmp_path / job / ".hydra" / "overrides.yaml").write_text(f"- loss.alpha=0.{job}\n")
        (tmp_path / job / "summary.json").write_text(text)
    shutil.rmtree(tmp_path / "unrelated", ignore_errors=True)
    varying, records, _ = read_jobs(tmp_path, "val/acc_best")
    assert varying == ["loss.alpha"] and [r["status"] for r in records] == ["ok", "unreadable"]
    assert records[0]["value"] == 0.5 and records[1]["value"] is None


def test_a_full_disk_is_one_line_and_leaves_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    import numpy as np

    from kd_lightning.engine.caching.store import write_text_atomic
    from kd_lightning.engine.errors import ConfigError
    from kd_lightning.teacher.outputs import TeacherOutputCache

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = tmp_path / "summary.json"
    monkeypatch.setattr(os, "fdopen", full)
    with pytest.raises(ConfigError, match=f"no space left on the disk of {tmp_path}"):
        write_text_atomic(target, "{}")
    monkeypatch.undo()
    cache = TeacherOutputCache(location="disk", directory=str(tmp_path / "tables"))
    monkeypatch.setattr(np, "save", full)
    with pytest.raises(ConfigError, match="no space left"):
        cache.write(tmp_path / "tables" / "entry", {"logits": np.zeros((4, 3), np.float32)}, {"split": "train"})
    left = sorted(p.name for p in tmp_path.rglob("*"))
    assert left == ["tables"], left  # no temporary file or directory, no half entry


def test_a_safetensors_file_is_written_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import safetensors.torch
    import torch
    from safetensors.torch import load_file

    from kd_lightning.engine.caching.store import write_safetensors_atomic
    from kd_lightning.engine.errors import ConfigError

    target = tmp_path / "model.safetensors"
    write_safetensors_atomic(target, {"w": torch.arange(6.0).reshape(2, 3).t()})  # a non-contiguous tensor
    assert torch.equal(load_file(str(target))["w"], torch.arange(6.0).reshape(2, 3).t())

    def full(tensors, filename, *args, **kwargs):
        open(filename, "wb").write(b"half")  # noqa: SIM115 - a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConfigError, match=f"no space left on the disk of {tmp_path}"):
        write_safetensors_atomic(target, {"w": torch.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # the old file, no temporary
    assert torch.equal(load_file(str(target))["w"], torch.arange(6.0).reshape(2, 3).t())
