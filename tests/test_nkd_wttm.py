"""NKD and WTTM against transcriptions of their authors' code: value and gradient in float64.

The two ``authors_*`` functions below transcribe (not import) the authors' public implementations, with their
indexing and reductions kept as written:

- NKD: github.com/yzd-v/cls_KD, ``mmcls/models/dis_losses/nkd.py`` (``NKDLoss.forward``) at commit
  1e5d48f36957ee460d39d7ebc592c6cc7f8f3d66, i.e. after 9466b3f fixed the non-target mask to
  ``scatter_(1, label, 0)``; the same code is in ``mmcls/distillation/losses/nkd.py`` after ad4876f.
- WTTM: github.com/zkxufo/TTM, ``distiller_zoo/wttm.py`` (``WTTM.forward``) at commit
  2de9060d32b85221c00d864d47b8f68016491d86 (unchanged at HEAD fe457b33a71ba27536ec04fe3d32c5b04963522f).

Tolerance: relative error <= 1e-10 on the value and on every gradient entry (plus 1e-12 absolute), float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.losses import NKD, TERMS, UNLABELLED, WTTM

RTOL, ATOL = 1e-10, 1e-12


def authors_nkd(logit_s: torch.Tensor, logit_t: torch.Tensor, gt_label: torch.Tensor, temp: float, gamma: float):
    label = gt_label.view(len(gt_label), 1)
    n, _ = logit_s.shape
    s_i = F.log_softmax(logit_s, dim=1)
    t_i = F.softmax(logit_t, dim=1)
    s_t = torch.gather(s_i, 1, label)
    t_t = torch.gather(t_i, 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    logit_s = logit_s[mask].reshape(n, -1)
    logit_t = logit_t[mask].reshape(n, -1)
    big_s = F.log_softmax(logit_s / temp, dim=1)
    big_t = F.softmax(logit_t / temp, dim=1)
    loss_non = (big_t * big_s).sum(dim=1).mean()
    loss_non = -gamma * (temp**2) * loss_non
    return loss_t + loss_non


def authors_wttm(y_s: torch.Tensor, y_t: torch.Tensor, l: float):  # noqa: E741 - the authors' name for gamma
    p_s = F.log_softmax(y_s, dim=1)
    p_t = torch.pow(torch.softmax(y_t, dim=1), l)
    norm = torch.sum(p_t, dim=1)
    p_t = p_t / norm.unsqueeze(1)
    kl = torch.sum(F.kl_div(p_s, p_t, reduction="none"), dim=1)
    return torch.mean(norm * kl)


def logits(seed: int, batch: int = 7, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(batch, classes, generator=generator, dtype=torch.float64) * 4
    labels = torch.randint(0, classes, (batch,), generator=generator)
    return student, teacher, labels


def value_and_grad(fn, student: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = student.clone().requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    return value.detach(), grad


def assert_same(ours: tuple[torch.Tensor, torch.Tensor], theirs: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(ours[0], theirs[0], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours[1], theirs[1], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(("temp", "gamma"), [(1.0, 1.5), (3.0, 3.5), (0.5, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_nkd_matches_the_authors_code(temp: float, gamma: float, seed: int) -> None:
    student, teacher, labels = logits(seed)
    term = NKD(gamma=gamma, temperature=temp)
    assert_same(
        value_and_grad(lambda s: term(s, teacher, labels), student),
        value_and_grad(lambda s: authors_nkd(s, teacher, labels, temp, gamma), student),
    )


def test_nkd_unlabelled_rows_and_no_targets_use_the_teachers_top1() -> None:
    student, teacher, labels = logits(2)
    labels[[1, 4]] = UNLABELLED
    filled = torch.where(labels == UNLABELLED, teacher.argmax(-1), labels)
    term = NKD(gamma=3.5, temperature=3.0)
    expected = authors_nkd(student, teacher, filled, 3.0, 3.5)
    torch.testing.assert_close(term(student, teacher, labels), expected, rtol=RTOL, atol=ATOL)
    expected_top1 = authors_nkd(student, teacher, teacher.argmax(-1), 3.0, 3.5)
    torch.testing.assert_close(term(student, teacher), expected_top1, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("ttm_l", [0.1, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_wttm_matches_the_authors_code(ttm_l: float, seed: int) -> None:
    student, teacher, labels = logits(seed)
    term = WTTM(temperature=1.0 / ttm_l)
    assert_same(
        value_and_grad(lambda s: term(s, teacher, labels), student),
        value_and_grad(lambda s: authors_wttm(s, teacher, ttm_l), student),
    )


def test_wttm_stays_finite_for_a_confident_teacher_where_the_power_underflows() -> None:
    """A teacher probability of e^-800 underflows to 0 in the authors' ``pow(softmax)``; the term works in log
    space and agrees with their code where theirs is exact (here, the values are equal to 1e-10)."""
    student, teacher, _ = logits(3)
    teacher[:, 0] += 800.0
    value = WTTM(temperature=5.0)(student, teacher)
    assert torch.isfinite(value)
    torch.testing.assert_close(value, authors_wttm(student, teacher, 0.2), rtol=RTOL, atol=ATOL)


def test_wttm_at_temperature_1_is_the_kl_and_follows_the_loss_temperature() -> None:
    """gamma = 1: U = 1 and the term is KL(p_t || p_s); with temperature null it follows loss.temperature."""
    student, teacher, _ = logits(4)
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(WTTM(temperature=1.0)(student, teacher), kl, rtol=RTOL, atol=ATOL)
    assert WTTM().follows_loss_temperature and not NKD(temperature=3.0).follows_loss_temperature


def test_both_are_registered_under_their_config_names() -> None:
    assert TERMS["nkd"] is NKD and TERMS["wttm"] is WTTM
