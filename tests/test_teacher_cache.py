"""Teacher-output cache and teacher reuse: same losses as the live teacher, tables shared across runs,
damaged tables rebuilt, top-k + tail, refusals (feature losses, random augmentation), validation reuse."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.losses import DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import MLP, ConvNet1D
from kd_lightning.recipes.distill import distill
from kd_lightning.teacher.outputs import TeacherOutputCache
from tests.conftest import TINY, compose_config


@pytest.fixture(scope="module")
def data(kd_home: Path) -> MNIST1DDataModule:
    datamodule = MNIST1DDataModule(str(kd_home / "data"), batch_size=64, transfer_samples=200, return_index=True)
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def teacher() -> ConvNet1D:
    torch.manual_seed(0)
    return ConvNet1D(channels=8).eval()


def counting(model: torch.nn.Module) -> list[int]:
    """A list that grows by one on every forward call of ``model``."""
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    return calls


def module(
    runtime: Runtime, model: torch.nn.Module | None = None, cache: TeacherOutputCache | None = None
) -> DistillationModule:
    torch.manual_seed(1)
    return DistillationModule(
        student=MLP(hidden=16),
        teacher=model if model is not None else teacher(),
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.9, temperature=4.0),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=10,
        runtime=runtime,
        teacher_cache=cache,
    )


def fit(model: DistillationModule, data: MNIST1DDataModule, epochs: int = 1) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-6), ("float16", 2e-3)])
def test_cached_logits_give_the_live_teachers_loss_for_the_same_batch(
    data: MNIST1DDataModule, tmp_path: Path, dtype: str, tolerance: float
) -> None:
    cache = TeacherOutputCache("disk", str(tmp_path), dtype=dtype)
    live = teacher()
    cache.prepare(live, data, ("train",), torch.device("cpu"))
    x, y, index = next(iter(data.train_dataloader()))  # a shuffled batch: lookups follow the indices
    loss = DistillationLoss({"kd": KLDivergence()}, alpha=0.9, temperature=4.0)
    student = {"logits": MLP(hidden=16)(x)}
    with torch.no_grad():
        expected = loss({"student": student, "teacher": {"logits": live(x)}}, y).total
    cached = loss({"student": student, "teacher": {"logits": cache.logits("train", index)}}, y).total
    assert cached.item() == pytest.approx(expected.item(), rel=tolerance)


def test_disk_tables_are_reused_by_a_second_run_without_a_teacher_forward(
    data: MNIST1DDataModule, tmp_path: Path
) -> None:
    first = TeacherOutputCache("disk", str(tmp_path))
    first.prepare(teacher(), data, ("train", "val"), torch.device("cpu"))
    assert first.hits == {"train": False, "val": False}
    same = teacher()
    calls = counting(same)
    second = TeacherOutputCache("disk", str(tmp_path))
    second.prepare(same, data, ("train", "val"), torch.device("cpu"))
    assert second.hits == {"train": True, "val": True} and not calls
    index = torch.arange(5)
    assert torch.equal(first.logits("val", index), second.logits("val", index))
    other = TeacherOutputCache("disk", str(tmp_path))  # different weights: a different key, a miss
    other.prepare(ConvNet1D(channels=8), data, ("val",), torch.device("cpu"))
    assert other.hits == {"val": False}


def test_reuse_is_logged_only_for_a_table_an_earlier_run_wrote(
    data: MNIST1DDataModule, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """teacher_cache=disk: the run that computes and writes a table does not say it reuses it; the next one does."""
    caplog.set_level("INFO", logger="kd_lightning.teacher.outputs")
    TeacherOutputCache("disk", str(tmp_path)).prepare(teacher(), data, ("train", "val"), torch.device("cpu"))
    assert "Reusing cached teacher outputs" not in caplog.text
    TeacherOutputCache("disk", str(tmp_path)).prepare(teacher(), data, ("train", "val"), torch.device("cpu"))
    assert caplog.text.count("Reusing cached teacher outputs") == 2  # one line per split read back


def test_a_damaged_table_is_rebuilt(data: MNIST1DDataModule, tmp_path: Path, caplog) -> None:
    TeacherOutputCache("disk", str(tmp_path)).prepare(teacher(), data, ("val",), torch.device("cpu"))
    (table,) = tmp_path.glob("*/logits.npy")
    table.write_bytes(table.read_bytes()[:-8] + b"\0" * 8)
    again = TeacherOutputCache("disk", str(tmp_path))
    again.prepare(teacher(), data, ("val",), torch.device("cpu"))
    assert again.hits == {"val": False} and "damaged" in caplog.text
    live = teacher()(data.splits["val"].tensors[0][-3:])
    assert torch.allclose(again.logits("val", torch.arange(997, 1000)), live, atol=1e-2)


def test_top_k_keeps_the_top_probabilities_and_the_tail_mass(data: MNIST1DDataModule) -> None:
    cache = TeacherOutputCache("memory", top_k=3, dtype="float32")
    cache.prepare(teacher(), data, ("val",), torch.device("cpu"))
    index = torch.arange(10)
    probs = teacher()(data.splits["val"].tensors[0][:10]).softmax(-1)
    rebuilt = cache.logits("val", index).softmax(-1)
    top, ids = probs.topk(3, dim=-1)
    assert torch.allclose(rebuilt.gather(-1, ids), top, atol=1e-5)
    assert torch.allclose(rebuilt.sum(-1), torch.ones(10), atol=1e-5)
    tail = 1 - top.sum(-1, keepdim=True)
    others = rebuilt.scatter(-1, ids, 0.0)
    assert torch.allclose(others.sum(-1, keepdim=True), tail, atol=1e-5)
    assert torch.allclose(others.max(-1).values, (tail / 7).squeeze(-1), atol=1e-5)  # spread evenly


def test_training_with_the_cache_runs_no_teacher_forward(data: MNIST1DDataModule) -> None:
    model = teacher()
    calls = counting(model)
    fit(module(Runtime(), model, TeacherOutputCache("memory", dtype="float32")), data)
    batches = sum(-(-len(data.splits[s]) // 512) for s in ("train", "val"))  # one pass to fill the tables
    assert len(calls) == batches


def test_validation_teacher_outputs_are_computed_once_and_reused(data: MNIST1DDataModule) -> None:
    model = teacher()
    calls = counting(model)
    trainer = fit(module(Runtime(), model), data, epochs=3)
    train_batches, val_batches = trainer.num_training_batches, int(trainer.num_val_batches[0])
    assert len(calls) == 3 * train_batches + val_batches
    calls.clear()
    fit(module(Runtime(reuse_val_teacher_outputs=False), model), data, epochs=3)
    assert len(calls) == 3 * (train_batches + val_batches)


def test_cache_refuses_feature_losses_and_random_augmentation(tmp_path: Path, kd_home: Path) -> None:
    overrides = [*TINY, "logger=none", "compare_scratch=false", "teacher_cache=memory"]
    with pytest.raises(ConfigError, match=r"^teacher_cache stores teacher logits only.*teacher_layer"):
        distill(compose_config(tmp_path / "a", [*overrides, "loss=at", "student=cnn1d_narrow"]))

    class Augmented(MNIST1DDataModule):
        random_augmentation = True

    model = module(Runtime(), cache=TeacherOutputCache("memory"))
    augmented = Augmented(str(kd_home / "data"), return_index=True)
    with pytest.raises(ConfigError, match=r"random_augmentation=True.*stale"):
        fit(model, augmented)


def test_a_sweep_of_runs_shares_one_set_of_disk_tables(tmp_path: Path, kd_home: Path) -> None:
    overrides = [*TINY, "logger=none", "compare_scratch=false", "teacher_cache=disk"]
    overrides.append(f"teacher_cache.directory={tmp_path / 'tables'}")
    losses = []
    for temperature in (2, 8):
        cfg = compose_config(tmp_path / f"t{temperature}", [*overrides, f"loss.temperature={temperature}"])
        summary = distill(cfg)
        assert summary["config"]["data"]["return_index"] is True  # turned on for the cache, and recorded
        losses.append(summary["metrics"]["train/loss"])
    assert len(list((tmp_path / "tables").iterdir())) == 3  # train, val, test: written once, read by both
    assert np.isfinite(losses).all() and losses[0] != losses[1]
