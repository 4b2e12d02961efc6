"""DistillationLoss and KLDivergence against hand-written formulas."""

from __future__ import annotations

import math

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import TERMS, UNLABELLED, DistillationLoss, KLDivergence, masked_cross_entropy

torch.manual_seed(0)
STUDENT = torch.randn(6, 5, dtype=torch.float64)
TEACHER = torch.randn(6, 5, dtype=torch.float64) * 2
TARGETS = torch.tensor([0, 1, 2, 3, 4, 0])


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """KL(p_t || p_s) per sample, averaged, written out with explicit sums."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist(), strict=False):
        zs = [math.exp(v / temperature) for v in s_row]
        zt = [math.exp(v / temperature) for v in t_row]
        ps = [v / sum(zs) for v in zs]
        pt = [v / sum(zt) for v in zt]
        total += sum(p * math.log(p / q) for p, q in zip(pt, ps, strict=False))
    return total / len(student)


def hand_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> float:
    total, count = 0.0, 0
    for row, y in zip(logits.tolist(), targets.tolist(), strict=False):
        if y == UNLABELLED:
            continue
        log_z = math.log(sum(math.exp(v) for v in row))
        log_p = [v - log_z for v in row]
        k = len(row)
        total += -sum(((1 - smoothing) * (i == y) + smoothing / k) * lp for i, lp in enumerate(log_p))
        count += 1
    return total / count


def make_loss(alpha: float, temperature: float, label_smoothing: float = 0.0) -> DistillationLoss:
    return DistillationLoss(
        {"kd": KLDivergence()}, alpha=alpha, temperature=temperature, label_smoothing=label_smoothing
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_term_is_t_squared_times_kl(temperature: float) -> None:
    value = KLDivergence(temperature)(STUDENT, TEACHER)
    assert value.item() == pytest.approx(temperature**2 * hand_kl(STUDENT, TEACHER, temperature), rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_total_is_alpha_weighted_sum(alpha: float) -> None:
    out = make_loss(alpha, 4.0)({"student": {"logits": STUDENT}, "teacher": {"logits": TEACHER}}, TARGETS)
    expected = (1 - alpha) * hand_ce(STUDENT, TARGETS) + alpha * 16 * hand_kl(STUDENT, TEACHER, 4.0)
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.parts["ce"].item() == pytest.approx(hand_ce(STUDENT, TARGETS), rel=1e-5)


def test_alpha_zero_needs_no_teacher() -> None:
    loss = make_loss(0.0, 4.0)
    assert not loss.needs_teacher
    out = loss({"student": {"logits": STUDENT}}, TARGETS)
    assert out.total.item() == pytest.approx(hand_ce(STUDENT, TARGETS), rel=1e-6)
    assert set(out.parts) == {"ce"}


def test_alpha_one_is_pure_distillation() -> None:
    out = make_loss(1.0, 2.0)({"student": {"logits": STUDENT}, "teacher": {"logits": TEACHER}}, TARGETS)
    assert out.total.item() == pytest.approx(4 * hand_kl(STUDENT, TEACHER, 2.0), rel=1e-5)


def test_label_smoothing_matches_formula() -> None:
    out = make_loss(0.0, 4.0, label_smoothing=0.1)({"student": {"logits": STUDENT}}, TARGETS)
    assert out.total.item() == pytest.approx(hand_ce(STUDENT, TARGETS, smoothing=0.1), rel=1e-5)


def test_unlabelled_samples_skip_task_term_only() -> None:
    targets = TARGETS.clone()
    targets[:3] = UNLABELLED
    out = make_loss(0.5, 4.0)({"student": {"logits": STUDENT}, "teacher": {"logits": TEACHER}}, targets)
    assert out.parts["ce"].item() == pytest.approx(hand_ce(STUDENT, targets), rel=1e-5)
    assert out.parts["kd"].item() == pytest.approx(16 * hand_kl(STUDENT, TEACHER, 4.0), rel=1e-5)


def test_all_unlabelled_batch_gives_zero_task_loss_with_graph() -> None:
    student = STUDENT.clone().requires_grad_()
    out = make_loss(0.5, 4.0)(
        {"student": {"logits": student}, "teacher": {"logits": TEACHER}}, torch.full((6,), UNLABELLED)
    )
    assert out.parts["ce"].item() == 0.0
    out.total.backward()
    assert torch.isfinite(student.grad).all()


def test_identical_student_and_teacher_give_zero_kd() -> None:
    assert KLDivergence(4.0)(TEACHER, TEACHER).item() == pytest.approx(0.0, abs=1e-12)


def test_temperature_propagates_to_terms() -> None:
    loss = make_loss(0.9, 4.0)
    loss.temperature = 2.0
    assert loss.terms["kd"].temperature == 2.0


def test_kd_gradient_matches_autograd_of_formula() -> None:
    assert torch.autograd.gradcheck(lambda s: KLDivergence(3.0)(s, TEACHER), (STUDENT.clone().requires_grad_(),))


def test_bf16_autocast_stays_finite() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = (torch.randn(8, 10) * 30).bfloat16()
        teacher = (torch.randn(8, 10) * 30).bfloat16()
        out = make_loss(0.9, 1.0)({"student": {"logits": student}, "teacher": {"logits": teacher}}, torch.arange(8))
    assert torch.isfinite(out.total)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"alpha": 1.5}, "loss.alpha"),
        ({"alpha": -0.1}, "loss.alpha"),
        ({"temperature": 0.0}, "loss.temperature"),
        ({"temperature": -1.0}, "loss.temperature"),
        ({"label_smoothing": 1.0}, "loss.label_smoothing"),
    ],
)
def test_bad_hyperparameters_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        DistillationLoss({"kd": KLDivergence()}, **kwargs)


def test_unknown_weight_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"loss\.weights"):
        DistillationLoss({"kd": KLDivergence()}, weights={"fitnet": 1.0})


def test_registry_mirrors_loss_configs() -> None:
    from pathlib import Path

    from kd_lightning.cli.common import CONFIG_DIR

    names = {p.stem for p in (Path(CONFIG_DIR) / "loss").glob("*.yaml")}
    assert names == set(TERMS)


def test_task_term_with_the_mean_label_count_is_the_global_batch_mean_across_processes() -> None:
    """Two "processes" hold 3 and 1 labelled samples: averaging their losses (what DDP does to gradients)
    gives the global-batch mean when each divides by the mean count per process, not by its own count."""
    torch.manual_seed(0)
    logits, targets = torch.randn(8, 5), torch.tensor([0, 1, 2, UNLABELLED, 3, UNLABELLED, UNLABELLED, UNLABELLED])
    halves = [(logits[:4], targets[:4]), (logits[4:], targets[4:])]
    mean_count = torch.tensor(4 / 2)
    averaged = sum(masked_cross_entropy(x, y, 0.1, label_count=mean_count) for x, y in halves) / 2
    assert averaged == pytest.approx(masked_cross_entropy(logits, targets, 0.1).item(), rel=1e-6)
    own_counts = sum(masked_cross_entropy(x, y, 0.1) for x, y in halves) / 2
    assert abs(own_counts - averaged) > 1e-3  # the per-process mean is a different (wrong) objective
    assert masked_cross_entropy(logits[5:], targets[5:]).item() == 0.0  # nothing labelled


def test_the_loss_says_whether_it_reads_hard_labels() -> None:
    """``reads_labels``: the cross-entropy counts (alpha < 1, ``weighs_task_term``: the only reader of the label
    count) or a weighted term splits on the target class (``label_terms``); and it is what the total depends on."""
    from kd_lightning.losses import DKD

    outputs = {"student": {"logits": STUDENT}, "teacher": {"logits": TEACHER}}
    other = TARGETS.roll(1)

    def depends_on_labels(loss: DistillationLoss) -> bool:
        return loss(outputs, TARGETS).total.item() != loss(outputs, other).total.item()

    task = DistillationLoss({"kd": KLDivergence()}, alpha=0.5)  # alpha < 1: the cross-entropy reads labels
    assert task.reads_labels and task.weighs_task_term and task.label_terms == [] and depends_on_labels(task)
    dkd = DistillationLoss({"kd": KLDivergence(), "dkd": DKD()}, alpha=1.0)  # alpha = 1, a label-reading term
    assert dkd.reads_labels and not dkd.weighs_task_term and dkd.label_terms == ["dkd"] and depends_on_labels(dkd)
    pure = DistillationLoss({"kd": KLDivergence()}, alpha=1.0)  # alpha = 1, no such term
    assert not pure.reads_labels and pure.label_terms == [] and not depends_on_labels(pure)
    unweighted = DistillationLoss({"kd": KLDivergence(), "dkd": DKD()}, alpha=1.0, weights={"dkd": 0.0})
    assert not unweighted.reads_labels and not depends_on_labels(unweighted)  # DKD runs, weighted 0
    assert {name for name, term in TERMS.items() if term.reads_labels} == {"dkd", "nkd", "sdd", "wkd_l"}


def test_the_loss_says_whether_it_distils() -> None:
    assert DistillationLoss({"kd": KLDivergence()}, alpha=0.5).distils
    assert not DistillationLoss({"kd": KLDivergence()}, alpha=0.0).distils
    assert not DistillationLoss({"kd": KLDivergence()}, alpha=0.5, weights={"kd": 0.0}).distils
    assert not DistillationLoss({}, alpha=0.5).distils
    assert DistillationLoss({"kd": KLDivergence(), "b": KLDivergence()}, alpha=0.5, weights={"kd": 0.0}).distils
