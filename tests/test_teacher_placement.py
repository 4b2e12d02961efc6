"""teacher_cache=auto (the default): the teacher's outputs are stored once exactly when that trains as a live
teacher would, the choice is one log line and a summary field, and a cached run equals a live one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.utils import instantiate

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.methods import DataFreeDistillation, DistillationModule, MutualLearning, Supervised
from kd_lightning.teacher.placement import AutoPlacement, Placement
from tests.conftest import TINY, compose_config
from tests.test_cli import run


def loss(*overrides: str):
    return instantiate(compose_config(Path("."), list(overrides)).loss)


@pytest.mark.parametrize(
    ("method", "overrides", "teachers", "reason"),
    [
        (DistillationModule, [], [], "no teacher"),
        (Supervised, [], ["teacher"], "cannot read cached"),
        (MutualLearning, [], ["teacher"], "cannot read cached"),
        (DataFreeDistillation, [], ["teacher"], "cannot read cached"),
        (DistillationModule, ["loss.alpha=0"], ["teacher"], "does not distil"),
        (DistillationModule, ["loss=fitnet"], ["teacher"], "reads a layer of teacher"),
    ],
    ids=["no-teacher", "supervised", "mutual", "data-free", "alpha-zero", "feature-loss"],
)
def test_auto_keeps_the_teacher_live_when_the_method_or_loss_rules_a_cache_out(
    method: type, overrides: list[str], teachers: list[str], reason: str
) -> None:
    placement = AutoPlacement().before_data(method, loss(*overrides), teachers)
    assert placement is not None and placement.where == "live" and reason in placement.reason
    assert AutoPlacement().cache_config(placement) is None


def test_auto_lets_the_data_decide_for_a_logit_loss() -> None:
    assert AutoPlacement().before_data(DistillationModule, loss(), ["teacher"]) is None
    for name in ("kd", "dkd", "dist"):
        assert AutoPlacement().before_data(DistillationModule, loss(f"loss={name}"), ["teacher"]) is None, name


def test_auto_stores_in_memory_or_on_disk_by_size_and_runs_live_on_augmented_data(tmp_path: Path) -> None:
    data = MNIST1DDataModule(data_dir=str(tmp_path), transfer_samples=0)
    small = AutoPlacement().with_data(data, 10)
    assert small.where == "memory" and AutoPlacement().cache_config(small)["directory"] is None
    large = AutoPlacement(memory_limit_mib=0, directory=str(tmp_path / "t")).with_data(data, 10)
    assert large.where == "disk" and AutoPlacement(0, str(tmp_path / "t")).cache_config(large)["directory"]
    node = AutoPlacement().cache_config(small)
    assert node["dtype"] == "float32" and node["top_k"] is None  # the live teacher's numbers, exactly
    augmented = MNIST1DDataModule(data_dir=str(tmp_path), transfer_samples=0, augment={"max_shift": 5})
    assert AutoPlacement().with_data(augmented, 10) == Placement(
        "live", "the data has random augmentation, so stored outputs would be stale"
    )


def test_a_cached_default_run_equals_a_live_one(kd_home: Path) -> None:
    """The stored float32 logits are the live teacher's (eval mode, same inputs): accuracies and agreement are
    equal, losses within 1e-6 relative (the order of a float32 sum differs)."""
    common = [*TINY, "compare_scratch=false", "logger=none"]
    summaries, logs = {}, {}
    for name, extra in (("auto", []), ("live", ["teacher_cache=none"])):
        run_dir = kd_home / "placement" / name
        result = run("kd-distill", *common, *extra, f"hydra.run.dir={run_dir}", home=kd_home)
        assert result.returncode == 0, result.stderr[-3000:]
        summaries[name] = json.loads((run_dir / "summary.json").read_text())
        logs[name] = [line for line in (result.stdout + result.stderr).splitlines() if "teacher outputs:" in line]
    assert len(logs["auto"]) == 1 and "teacher outputs: memory (logit-only loss" in logs["auto"][0]
    assert len(logs["live"]) == 1 and "teacher outputs: live (teacher_cache=none)" in logs["live"][0]
    assert summaries["auto"]["details"]["teacher_placement"]["where"] == "memory"
    assert summaries["auto"]["teacher_costs"]["teacher"]["cached"]
    auto, live = summaries["auto"]["metrics"], summaries["live"]["metrics"]
    assert auto.keys() == live.keys() and auto == pytest.approx(live, rel=1e-6)
    exact = [name for name in auto if "acc" in name or "agreement" in name]
    assert exact and all(auto[name] == live[name] for name in exact)
