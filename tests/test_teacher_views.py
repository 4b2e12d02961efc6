"""The per-view teacher cache (``teacher_cache=per_view``, FKD): augmented views replayed bit for bit, the
teacher's stored outputs are its outputs on those views, training never runs the teacher, disk entries are
shared (views across teachers, tables across runs), and data it cannot serve is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.runtime import Runtime
from kd_lightning.recipes.distill import distill
from kd_lightning.teacher.outputs import TeacherOutputCache
from kd_lightning.teacher.views import TeacherViewCache, view_seed
from tests.conftest import TINY, compose_config
from tests.test_teacher_cache import counting, fit, module, teacher

AUGMENT = {"max_shift": 4, "scale": 0.4, "shear": 1.0, "iid_noise": 0.2, "corr_noise": 0.3}
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(kd_home: Path) -> MNIST1DDataModule:
    datamodule = MNIST1DDataModule(
        str(kd_home / "data"), batch_size=64, transfer_samples=200, return_index=True, augment=AUGMENT
    )
    datamodule.prepare_data()
    datamodule.setup()
    return datamodule


def expected_views(data: MNIST1DDataModule, seed: int, view: int) -> torch.Tensor:
    """View ``view`` of every training sample, drawn here independently of the cache: the same generator
    seed, the same index-order batches, the augmentation's own draw and apply."""
    generator = torch.Generator().manual_seed(view_seed(seed, view))
    return torch.cat(
        [data.augment.apply(x, data.augment.draw(x, generator)) for x, *_ in data.ordered_dataloader("train")]
    )


def test_every_epoch_replays_its_stored_view_bit_for_bit_with_the_teachers_outputs_on_it(
    data: MNIST1DDataModule,
) -> None:
    cache = TeacherViewCache(views=3, seed=7, location="memory", dtype="float32")
    model = teacher()
    cache.prepare(model, data, ("train", "val"), CPU)
    assert cache.labelled_rows["train"] == 3 * data.num_train_samples and not cache.hits["train"]
    views = [expected_views(data, 7, view) for view in range(3)]
    assert not torch.equal(views[0], views[1])  # distinct views
    base = data.splits["train"].tensors[0]
    x, _, index = next(iter(data.train_dataloader()))  # a shuffled batch, as training sees it
    for epoch in range(5):
        cache.start_epoch(epoch)
        replayed = data.augment.apply_per_sample(x, cache.draw(index))
        assert torch.equal(replayed, views[epoch % 3][index])  # the stored view, bit for bit
        assert not torch.equal(replayed, base[index])  # and augmented
        with torch.no_grad():
            live = model(replayed)
        assert torch.allclose(cache.logits("train", index), live, atol=1e-5)  # the teacher's outputs on it
    assert torch.allclose(cache.logits("val", torch.arange(5)), model(data.splits["val"].tensors[0][:5]), atol=1e-5)


def test_training_replays_the_views_and_never_runs_the_teacher(data: MNIST1DDataModule) -> None:
    cache = TeacherViewCache(views=2, seed=3, location="memory")
    live = teacher()
    forwards = counting(live)
    method = module(Runtime(), live, cache)
    seen: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    original = method.training_step

    def recording_step(batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        seen.setdefault(method.current_epoch, []).append((batch[0].clone(), batch[2].clone()))
        return original(batch, batch_idx)

    method.training_step = recording_step  # type: ignore[method-assign]
    try:
        fit(method, data, epochs=3)
    finally:
        data.replay_views(None)
    filled = len(forwards)
    assert filled > 0  # the fill ran the teacher; training then looked every output up
    batches = sum(len(batches) for batches in seen.values())
    assert batches == 3 * len(data.train_dataloader()) and len(forwards) == filled
    views = [expected_views(data, 3, view) for view in range(2)]
    for epoch, batches in seen.items():
        for x, index in batches:
            assert torch.equal(x, views[epoch % 2][index])


def test_disk_views_are_shared_by_teachers_and_tables_by_later_runs(data: MNIST1DDataModule, tmp_path: Path) -> None:
    first = TeacherViewCache(views=2, location="disk", directory=str(tmp_path))
    first.prepare(teacher(), data, ("train",), CPU)
    other = nn.Sequential(nn.Flatten(), nn.Linear(40, 10))
    second = TeacherViewCache(views=2, location="disk", directory=str(tmp_path))
    second.prepare(other, data, ("train",), CPU)
    assert first.views_key == second.views_key
    for name, array in first.view_params.items():  # the second teacher labelled the same views
        assert np.array_equal(array, second.view_params[name])
    entries = sorted(path.name for path in tmp_path.iterdir())
    assert len([e for e in entries if e.startswith("views-")]) == 1 and len(entries) == 1 + 2 * 2  # + a table per view
    again, model = TeacherViewCache(views=2, location="disk", directory=str(tmp_path)), teacher()
    forwards = counting(model)
    again.prepare(model, data, ("train",), CPU)
    assert again.hits["train"] and again.labelled_rows["train"] == 0 and not forwards
    for view in range(2):
        assert np.array_equal(again.view_tables[view]["logits"], first.view_tables[view]["logits"])
    assert not np.array_equal(first.view_tables[0]["logits"], first.view_tables[1]["logits"])
    data.replay_views(None)


def test_kd_distill_trains_from_stored_views(tmp_path: Path, kd_home: Path) -> None:
    overrides = [*TINY, "teacher_cache=per_view", "teacher_cache.views=2", "compare_scratch=false", "logger=none"]
    cfg = compose_config(tmp_path / "run", [*overrides, "data.augment={max_shift: 3, iid_noise: 0.1}"])
    summary = distill(cfg)
    assert summary["config"]["data"]["return_index"] is True  # turned on for the lookups
    assert summary["teacher_costs"]["teacher"]["cached"] is True
    assert 0.0 < summary["metrics"]["test/acc"] <= 1.0


@pytest.mark.parametrize(
    ("augment", "return_index", "cache", "message"),
    [
        (None, True, TeacherViewCache(location="memory"), "no augmentation; use teacher_cache=disk"),
        ({**AUGMENT, "mixup_alpha": 1.0}, True, TeacherViewCache(location="memory"), "mixup_alpha=0"),
        (AUGMENT, False, TeacherViewCache(location="memory"), r"set data\.return_index=true"),
        (AUGMENT, True, TeacherOutputCache("memory"), "teacher_cache=per_view"),
    ],
    ids=["no-augmentation", "mixup", "no-sample-index", "plain-cache-on-augmented-data"],
)
def test_data_the_cache_cannot_serve_is_refused(
    augment: dict | None, return_index: bool, cache: TeacherOutputCache, message: str, kd_home: Path
) -> None:
    datamodule = MNIST1DDataModule(str(kd_home / "data"), augment=augment, return_index=return_index)
    with pytest.raises(ConfigError, match=message):
        cache.check_data(datamodule)
    if isinstance(cache, TeacherViewCache):  # prepare checks first: nothing is drawn or labelled
        with pytest.raises(ConfigError, match=message):
            cache.prepare(teacher(), datamodule, ("train",), CPU)
        assert not cache.view_params and not cache.view_tables


@pytest.mark.parametrize("views", [0, 1.5, True])
def test_bad_view_counts_name_the_key(views: object) -> None:
    with pytest.raises(ConfigError, match=r"teacher_cache\.views"):
        TeacherViewCache(views=views, location="memory")
