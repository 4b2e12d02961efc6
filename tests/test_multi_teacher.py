"""method=multi_teacher: the combined target, its weightings, per-teacher metrics, end to end."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import UNLABELLED, DistillationLoss, KLDivergence
from kd_lightning.methods import MultiTeacherDistillation
from kd_lightning.recipes.distill import distill
from tests.conftest import TINY, compose_config

T = 4.0


def method(combine: str = "mean", weights: dict | None = None, teachers: int = 2) -> MultiTeacherDistillation:
    torch.manual_seed(0)
    return MultiTeacherDistillation(
        student=nn.Linear(6, 3),
        teachers={f"teacher_{k}": nn.Linear(6, 3) for k in range(teachers)},
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.9, temperature=T),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
        combine=combine,
        weights=weights,
    )


def test_the_combined_target_is_the_weighted_mixture_of_softened_teachers() -> None:
    logits = {"teacher_0": torch.randn(5, 3) * 3, "teacher_1": torch.randn(5, 3) * 3}
    soft = {name: torch.softmax(z / T, -1) for name, z in logits.items()}
    mixed = torch.softmax(method().combined(logits, None) / T, -1)
    torch.testing.assert_close(mixed, (soft["teacher_0"] + soft["teacher_1"]) / 2)
    weighted = method("weights", {"teacher_0": 3.0, "teacher_1": 1.0}).combined(logits, None)
    torch.testing.assert_close(torch.softmax(weighted / T, -1), 0.75 * soft["teacher_0"] + 0.25 * soft["teacher_1"])


def test_a_one_teacher_ensemble_is_plain_kd_exactly() -> None:
    from kd_lightning.methods import DistillationModule

    multi = method(teachers=1)
    plain = DistillationModule(
        student=multi.student,
        teacher=multi.teacher_0,
        loss=DistillationLoss({"kd": KLDivergence()}, alpha=0.9, temperature=T),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
    )
    x, y = torch.randn(8, 6), torch.randint(3, (8,))
    torch.testing.assert_close(multi.training_step((x, y), 0), plain.training_step((x, y), 0))
    for combine in ("mean", "confidence"):
        weights = method(combine, teachers=1).sample_weights(["teacher_0"], torch.randn(1, 8, 3), y)
        torch.testing.assert_close(weights, torch.ones(1, 8))  # weights sum to 1 over the teachers


def test_confidence_weighs_the_teacher_that_is_right_more_per_sample() -> None:
    right, wrong = torch.tensor([[8.0, 0.0, 0.0], [0.0, 0.0, 8.0]]), torch.tensor([[0.0, 8.0, 0.0], [8.0, 0.0, 0.0]])
    targets = torch.tensor([0, UNLABELLED])
    weights = method("confidence").sample_weights(["teacher_0", "teacher_1"], torch.stack([right, wrong]), targets)
    assert weights[0, 0] > 0.99  # labelled: the teacher right about the label dominates
    assert math.isclose(float(weights[:, 1].sum()), 1.0, rel_tol=1e-6)
    assert abs(float(weights[0, 1]) - 0.5) < 1e-6  # unlabelled: equally sure teachers weigh the same


def test_bad_multi_teacher_configs_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"needs method\.teachers"):
        method(teachers=0)
    with pytest.raises(ConfigError, match=r"method\.weights=.*every teacher"):
        method("weights", {"teacher_0": 1.0})
    with pytest.raises(ConfigError, match=r"method\.combine='vote'"):
        method("vote")


def test_two_teachers_of_different_architectures_distil_end_to_end(tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path / "run", [*TINY, "method=multi_teacher", "compare_scratch=false", "logger=none"])
    summary = distill(cfg)
    metrics = summary["metrics"]
    for key in (
        "teacher/teacher_0/val_acc",
        "teacher/teacher_1/val_acc",
        "val/agreement/teacher_1",
        "teacher/teacher_0/test_acc",
        "teacher/val_acc",
        "val/agreement",
        "train/loss_kd",
    ):
        assert 0.0 <= metrics[key] < math.inf, key
    assert metrics["teacher/teacher_0/val_acc"] != metrics["teacher/teacher_1/val_acc"]  # two different teachers
    assert summary["teacher_params"] > 67_082  # the default teacher's parameters plus the second one's
    assert (tmp_path / "run" / "teacher_1" / "checkpoints").is_dir()  # trained with its own fit recipe
    costs = summary["teacher_costs"]  # what each teacher adds to a step, in the summary
    assert set(costs) == {"teacher_0", "teacher_1"}
    assert sum(cost["params"] for cost in costs.values()) == summary["teacher_params"]
    assert "| teacher_1 forward per step |" in (tmp_path / "run" / "summary.md").read_text()
    # one row per teacher (accuracy, parameters, source) and one for the combination, not one teacher's source
    assert set(summary["teachers"]) == {"teacher_0", "teacher_1"}
    assert sum(t["params"] for t in summary["teachers"].values()) == summary["teacher_params"]
    text = (tmp_path / "run" / "summary.md").read_text()
    for row in ("teacher teacher_0 test acc", "teacher teacher_1 test acc", "combined teachers test acc"):
        assert f"| {row} |" in text, row
    assert "| teacher test acc |" not in text


def test_the_summary_shows_each_teacher_and_the_combination() -> None:
    from kd_lightning.reporting.summary import Summary

    metrics = {"test/acc": 0.8, "teacher/test_acc": 0.9, "teacher/val_acc": 0.88, "val/agreement": 0.9}
    for name, acc in (("teacher_0", 0.85), ("teacher_1", 0.7)):
        metrics |= {f"teacher/{name}/test_acc": acc, f"teacher/{name}/val_acc": acc - 0.01}
    teachers = {"teacher_0": {"params": 2000, "source": "cache a"}, "teacher_1": {"params": 100, "source": "given"}}
    config = {"method": {"combine": "confidence"}}
    summary = Summary(metrics, 10, teacher_params=2100, teacher_source="cache a", teachers=teachers, config=config)
    rows = {quantity: (value, note) for quantity, value, note in summary.rows()}
    assert rows["teacher teacher_0 test acc"] == ("85.00%", "2,000 parameters; cache a")
    assert rows["teacher teacher_1 test acc"] == ("70.00%", "100 parameters; given")
    assert rows["combined teachers test acc"][0] == "90.00%"
    assert "2 teachers, method.combine=confidence" in rows["combined teachers test acc"][1]
    assert "teacher test acc" not in rows and rows["teacher parameters"][0] == "2,100"


def test_the_summary_reports_what_each_teacher_adds_per_step() -> None:
    """Per teacher: parameters, weight memory and the forward time on one training batch; a bigger teacher
    costs more, and a cached one adds nothing to a training step."""
    from kd_lightning.reporting.summary import Summary
    from kd_lightning.reporting.teacher_cost import teacher_costs
    from kd_lightning.teacher import Teacher
    from kd_lightning.teacher.outputs import TeacherOutputCache

    big, small = nn.Sequential(nn.Flatten(), nn.Linear(40, 2048), nn.Linear(2048, 10)), nn.Linear(40, 10)
    teachers = {
        "big": Teacher(big, "big"),
        "small": Teacher(small, "small", cache=TeacherOutputCache(location="memory")),
    }
    costs = teacher_costs(teachers, torch.randn(2, 40), 64, torch.device("cpu"))
    assert costs["big"]["params"] == 40 * 2048 + 2048 + 2048 * 10 + 10
    assert costs["big"]["weights_mib"] == pytest.approx(costs["big"]["params"] * 4 / 2**20)
    assert costs["small"]["params"] == 410 and costs["big"]["batch_size"] == 64
    assert costs["big"]["forward_ms"] > costs["small"]["forward_ms"] > 0
    assert costs["small"]["cached"] and not costs["big"]["cached"] and costs["big"]["activation_mib"] is None
    table = Summary(metrics={}, student_params=1, teacher_costs=costs).rows()
    rows, notes = {q: v for q, v, _ in table}, {q: n for q, _, n in table}
    assert rows["big forward per step"] == f"{costs['big']['forward_ms']:.2f} ms"
    assert rows["small forward per step"] == "0 ms (cached)"
    assert notes["big forward per step"].endswith("MiB weights")  # the weights' memory, in the note column
