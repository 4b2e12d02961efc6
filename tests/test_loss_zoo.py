"""Every zoo term against an independent numpy re-implementation of its paper's formula: value,
gradient (finite differences of the reference), gradcheck, bf16 autocast, and student == teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from kd_lightning.losses import (
    CC,
    CTKD,
    DIST,
    DKD,
    MLKD,
    NKD,
    NST,
    PKT,
    RKD,
    SP,
    UNLABELLED,
    VID,
    WKDL,
    WTTM,
    AttentionTransfer,
    FitNets,
    KLDivergence,
)
from kd_lightning.losses.terms import DistillationTerm
from tests import reference_losses as ref

TARGETS = [0, 1, 2, 3, 4, 0]


@dataclass(frozen=True)
class Case:
    name: str
    term: Callable[[], DistillationTerm]
    student_shape: tuple[int, ...]
    teacher_shape: tuple[int, ...]
    reference: Callable[[np.ndarray, np.ndarray], float]
    #: NKD, WKD-L (cross-entropies) and WTTM (T != 1: the student is matched to a transformed teacher) are not 0 there.
    zero_at_equality: bool = True

    def tensors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        student = torch.randn(self.student_shape, generator=generator, dtype=torch.float64)
        teacher = torch.randn(self.teacher_shape, generator=generator, dtype=torch.float64) * 2
        return student.to(dtype), teacher.to(dtype)


LOGITS, FEATURES = (6, 5), (4, 3, 7)


def sized_vid() -> VID:
    """A VID sized for (6, 4) -> (6, 3) vectors, in float64, with distinct per-channel variances."""
    torch.manual_seed(0)
    term = VID(beta=2.0)
    term.setup_shapes(torch.zeros(6, 4), torch.zeros(6, 3), "k")
    with torch.no_grad():
        term.raw_variance.copy_(torch.tensor([-1.0, 0.5, 3.0]))
    return term.double()


def vid_reference(s: np.ndarray, t: np.ndarray) -> float:
    term = sized_vid()
    weights = [m.weight.detach().numpy() for m in term.mean if isinstance(m, torch.nn.Linear)]
    variance = np.log1p(np.exp(term.raw_variance.detach().numpy())) + term.eps
    return ref.vid(s, t, weights, variance, 2.0)


#: The teacher classifier whose rows give WKD-L's category cost (5 classes, 3 features).
WKD_HEAD = np.random.default_rng(0).standard_normal((5, 3))


def bound_wkd_l() -> WKDL:
    """WKD-L (T 2, gamma 30: the authors' ImageNet values) with a fixed teacher classifier bound."""
    head = torch.nn.Linear(3, 5).double()
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(WKD_HEAD))
    term = WKDL(gamma=30.0, temperature=2.0)
    term.bind_models({"teacher": torch.nn.ModuleDict({"head": head})}, "loss.terms.wkd_l")
    return term


CASES = [
    Case("kd_standardized", lambda: KLDivergence(3.0, standardize=True), LOGITS, LOGITS,
         lambda s, t: ref.kd(s, t, 3.0, standardize=True)),
    Case("dkd", lambda: DKD(tckd_weight=1.0, nckd_weight=8.0, temperature=4.0), LOGITS, LOGITS,
         lambda s, t: ref.dkd(s, t, TARGETS, 1.0, 8.0, 4.0)),
    Case("dist", lambda: DIST(inter_weight=1.0, intra_weight=2.0, temperature=4.0), LOGITS, LOGITS,
         lambda s, t: ref.dist(s, t, 1.0, 2.0, 4.0)),
    Case("nkd", lambda: NKD(gamma=3.5, temperature=3.0), LOGITS, LOGITS,
         lambda s, t: ref.nkd(s, t, TARGETS, 3.5, 3.0), zero_at_equality=False),
    Case("wttm", lambda: WTTM(temperature=5.0), LOGITS, LOGITS, lambda s, t: ref.wttm(s, t, 5.0),
         zero_at_equality=False),
    Case("ctkd", lambda: CTKD(init=0.5).double(), LOGITS, LOGITS,
         lambda s, t: ref.kd(s, t, 1.0 + 20.0 / (1.0 + np.exp(-0.5)))),
    Case("mlkd", lambda: MLKD(temperatures=[2.0, 4.0]), LOGITS, LOGITS, lambda s, t: ref.mlkd(s, t, [2.0, 4.0])),
    Case("wkd_l", bound_wkd_l, LOGITS, LOGITS, lambda s, t: ref.wkd_l(s, t, TARGETS, WKD_HEAD, 30.0, 2.0),
         zero_at_equality=False),
    Case("fitnet", lambda: FitNets(beta=100.0), FEATURES, FEATURES, lambda s, t: ref.mse(s, t, 100.0)),
    Case("at", lambda: AttentionTransfer(beta=1000.0), FEATURES, (4, 5, 7), lambda s, t: ref.attention(s, t, 1000.0)),
    Case("rkd", lambda: RKD(distance_weight=25.0, angle_weight=50.0), (5, 4), (5, 2, 3),
         lambda s, t: ref.rkd(s, t, 25.0, 50.0)),
    Case("sp", lambda: SP(beta=3000.0), (5, 4), (5, 2, 3), lambda s, t: ref.sp(s, t, 3000.0)),
    Case("pkt", lambda: PKT(beta=30000.0), (5, 4), (5, 2, 3), lambda s, t: ref.pkt(s, t, 30000.0)),
    Case("cc", lambda: CC(beta=1.0, gamma=0.4, order=2), (5, 4), (5, 2, 3), lambda s, t: ref.cc(s, t, 1.0, 0.4, 2)),
    Case("vid", sized_vid, (6, 4), (6, 3), vid_reference),
    Case("nst", lambda: NST(beta=50.0), FEATURES, (4, 5, 7),
         lambda s, t: 50.0 * ref.nst_authors(torch.from_numpy(s), torch.from_numpy(t)).item()),
]  # fmt: skip
IDS = [case.name for case in CASES]


def targets_for(case: Case) -> torch.Tensor:
    return torch.tensor(TARGETS[: case.student_shape[0]])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_value_and_gradient_match_the_reference(case: Case) -> None:
    student, teacher = case.tensors()
    student.requires_grad_()
    value = case.term()(student, teacher, targets_for(case))
    value.backward()
    s, t = student.detach().numpy(), teacher.numpy()
    assert value.item() == pytest.approx(case.reference(s, t), rel=1e-6, abs=1e-9)
    expected = ref.numeric_gradient(lambda x: case.reference(x, t), s)
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-4, atol=1e-6 * max(1.0, abs(value.item())))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradcheck_in_float64(case: Case) -> None:
    student, teacher = case.tensors()
    term = case.term()
    targets = targets_for(case)
    assert torch.autograd.gradcheck(lambda s: term(s, teacher, targets), (student.requires_grad_(),))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_autocast_stays_finite(case: Case) -> None:
    student, teacher = case.tensors(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = case.term().float()(student * 30, teacher * 30, targets_for(case))
    assert value.dtype == torch.float32 and torch.isfinite(value)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.student_shape == c.teacher_shape and c.zero_at_equality], ids=lambda c: c.name
)
def test_identical_student_and_teacher_give_zero(case: Case) -> None:
    _, teacher = case.tensors()
    assert case.term()(teacher, teacher, targets_for(case)).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("term", [RKD(), SP(), PKT(), CC()], ids=lambda t: type(t).__name__)
def test_relation_terms_are_zero_for_identical_features(term: DistillationTerm) -> None:
    features = torch.randn(5, 6, dtype=torch.float64)
    assert term(features, features).item() == pytest.approx(0.0, abs=1e-10)


def test_dkd_unlabelled_rows_use_the_teachers_top1() -> None:
    student, teacher = CASES[1].tensors()
    targets = torch.tensor(TARGETS)
    targets[::2] = UNLABELLED
    filled = torch.where(targets == UNLABELLED, teacher.argmax(-1), targets)
    assert DKD()(student, teacher, targets).item() == pytest.approx(DKD()(student, teacher, filled).item(), rel=1e-12)
    expected = ref.dkd(student.numpy(), teacher.numpy(), filled.tolist(), 1.0, 8.0, 4.0)
    assert DKD()(student, teacher, targets).item() == pytest.approx(expected, rel=1e-6)
    assert DKD()(student, teacher).item() == pytest.approx(DKD()(student, teacher, teacher.argmax(-1)).item())


def test_dkd_parts_recompose_kd() -> None:
    """The paper's Eq. 6: KD = TCKD + (1 - p_t^target) * NCKD, per sample."""
    student, teacher = CASES[1].tensors()
    for b, y in enumerate(TARGETS):
        s, t, target = student[b : b + 1], teacher[b : b + 1], torch.tensor([y])
        tckd = DKD(tckd_weight=1.0, nckd_weight=0.0)(s, t, target)
        nckd = DKD(tckd_weight=0.0, nckd_weight=1.0)(s, t, target)
        p_target = torch.softmax(t / 4.0, dim=-1)[0, y]
        assert KLDivergence(4.0)(s, t).item() == pytest.approx((tckd + (1 - p_target) * nckd).item(), rel=1e-10)


@pytest.mark.parametrize("term", [KLDivergence(2.0, standardize=True), DKD(standardize=True)], ids=["kd", "dkd"])
def test_standardization_ignores_logit_shift_and_scale(term: DistillationTerm) -> None:
    student, teacher = CASES[1].tensors()
    targets = torch.tensor(TARGETS)
    moved = student * 7.5 + 3.0
    assert term(moved, teacher, targets).item() == pytest.approx(term(student, teacher, targets).item(), rel=1e-6)


def test_cc_taylor_series_converges_to_the_gaussian_rbf() -> None:
    e = torch.nn.functional.normalize(torch.randn(5, 4, dtype=torch.float64), dim=1)
    exact = torch.exp(-0.4 * torch.cdist(e, e) ** 2)
    assert torch.allclose(CC(order=20).relation(e), exact, atol=1e-10)


def test_negative_dkd_weights_name_the_key() -> None:
    from kd_lightning.engine.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^loss\.terms\.dkd\.tckd_weight=-1\.0"):
        DKD(tckd_weight=-1.0)
