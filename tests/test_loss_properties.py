"""Property-based tests (hypothesis) of every distillation term in ``TERMS`` and every token divergence in
``DIVERGENCES``: finite for finite inputs, non-negative (or bounded below) where the theory says so, zero
when the student equals the teacher, invariant to a per-sample constant added to the logits, and the
chunked token loss independent of its chunk size.

Tests are parametrized over the registries, so a new term or divergence is covered as soon as it has an
entry in :data:`BUILDERS` / :data:`DIVERGENCE_OPTIONS` (``test_tables_cover_the_registries`` fails until
it does). Inputs are float32-representable values in [-20, 20] (plus +-80 where stated), batch 2..8,
classes / features 2..12. Sign, zero and invariance checks run in float64 with the tolerances below;
finiteness is checked in float32, the precision training uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import Tensor, nn

from kd_lightning.llm.divergences import DIVERGENCES, TokenDivergence
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.losses import PKT, RKD, TERMS, VID, DistillationTerm
from kd_lightning.losses.features import hcl
from kd_lightning.losses.logits import LogitTerm
from kd_lightning.losses.relations import angle_cosines, pairwise_distances, span_coordinates

#: Reproducible in CI: a fixed derandomized search, no example database.
SETTINGS = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

MODERATE, LARGE = 20.0, 80.0
#: float64 tolerances (absolute): a value "non-negative" may dip to -NONNEG_ATOL, "zero" is within ZERO_ATOL.
NONNEG_ATOL = 1e-9
ZERO_ATOL = 1e-9
#: Shift invariance in float64: |f(z + c) - f(z)| <= SHIFT_ATOL + SHIFT_RTOL * |f(z)|.
SHIFT_RTOL, SHIFT_ATOL = 1e-7, 1e-8
#: The chunked token loss against itself unchunked, float64.
CHUNK_RTOL, CHUNK_ATOL = 1e-10, 1e-10

TERM_NAMES = sorted(TERMS)
LOGIT_TERMS = sorted(name for name, cls in TERMS.items() if issubclass(cls, LogitTerm))
DIVERGENCE_NAMES = sorted(DIVERGENCES)


# ------------------------------------------------------------------------------------------ strategies
def values(data: st.DataObject, shape: tuple[int, ...], dtype: torch.dtype, large: bool = False) -> Tensor:
    """A tensor of float32-representable values in [-20, 20]; with ``large``, entries may also be +-80."""
    elements = st.floats(-MODERATE, MODERATE, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=32)
    if large:
        elements = st.one_of(elements, st.sampled_from([-LARGE, LARGE]))
    # fill=nothing(): every element drawn on its own (the default fills most of an array with one value)
    array = data.draw(hnp.arrays(np.float32, shape, elements=elements, fill=st.nothing()), label=f"values{list(shape)}")
    return torch.from_numpy(array).to(dtype)


def integer(data: st.DataObject, low: int, high: int, label: str) -> int:
    return data.draw(st.integers(low, high), label=label)


def batch_size(data: st.DataObject) -> int:
    return integer(data, 2, 8, "batch")


def temperature(data: st.DataObject) -> float:
    return data.draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]), label="temperature")


def weight(low: float = 0.0, high: float = 8.0) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_subnormal=False)


def seeded(data: st.DataObject) -> int:
    """A torch seed drawn by hypothesis, so adapter initialisations and CRD's negatives are reproducible."""
    seed = integer(data, 0, 2**31 - 1, "torch_seed")
    torch.manual_seed(seed)
    return seed


# -------------------------------------------------------------------------------------- term builders
@dataclass
class Case:
    """A sized term and the two arguments (and keywords) of one call."""

    term: DistillationTerm
    student: Tensor | list[Tensor]
    teacher: Tensor | list[Tensor]
    targets: Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def __call__(self, student: Any = None, teacher: Any = None) -> Tensor:
        torch.manual_seed(self.seed)  # CRD draws its negatives from the global generator
        student = self.student if student is None else student
        teacher = self.teacher if teacher is None else teacher
        return self.term(student, teacher, self.targets, **self.extra)


def sized(name: str, term: DistillationTerm, student: Any, teacher: Any, dtype: torch.dtype) -> DistillationTerm:
    """What :class:`DistillationLoss.setup_shapes` does for one term, then the term in ``dtype``."""
    term.setup_shapes(student, teacher, f"loss.terms.{name}")
    return term.to(dtype)


#: Extra constructor arguments of each logit term, drawn per example.
LOGIT_OPTIONS: dict[str, dict[str, st.SearchStrategy]] = {
    "kd": {},
    "dkd": {"tckd_weight": weight(), "nckd_weight": weight()},
    "dist": {"inter_weight": weight(0.0, 2.0), "intra_weight": weight(0.0, 2.0)},
    "nkd": {"gamma": weight()},
    "wttm": {},
    "wkd_l": {"gamma": weight(0.0, 8.0)},
}


def logit_case(name: str) -> Callable[..., Case]:
    def build(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
        batch, classes = batch_size(data), integer(data, 2, 12, "classes")
        kwargs = {key: data.draw(strategy, label=key) for key, strategy in LOGIT_OPTIONS[name].items()}
        kwargs["temperature"] = temperature(data)
        kwargs["standardize"] = data.draw(st.booleans(), label="standardize")
        term = TERMS[name](**kwargs).to(dtype)
        student = values(data, (batch, classes), dtype, large)
        teacher = student.clone() if same else values(data, (batch, classes), dtype, large)
        labels = st.integers(-1, classes - 1)  # -1: unlabelled (DKD, NKD use the teacher's top-1)
        targets = data.draw(st.none() | hnp.arrays(np.int64, (batch,), elements=labels), label="targets")
        return Case(term, student, teacher, None if targets is None else torch.from_numpy(targets))

    return build


def feature_shapes(
    data: st.DataObject, same: bool, *, maps: bool = False, same_layout: bool = False
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Student and teacher feature shapes: vectors ``(B, D)``, 1-D ``(B, C, L)`` or 2-D ``(B, C, H, W)`` maps.

    ``maps``: conv maps only; ``same_layout``: the same rank and spatial size (only the channels differ);
    ``same``: identical shapes."""
    batch = batch_size(data)

    def one(rank: int | None = None, spatial: tuple[int, ...] | None = None) -> tuple[int, ...]:
        rank = rank or data.draw(st.sampled_from([3, 4] if maps else [2, 3, 4]), label="rank")
        spatial = spatial if spatial is not None else tuple(integer(data, 1, 4, "size") for _ in range(rank - 2))
        return (batch, integer(data, 1, 6 if rank > 2 else 12, "channels"), *spatial)

    student = one()
    if same:
        return student, student
    return student, one(len(student), student[2:]) if same_layout else one()


def feature_case(name: str, *, maps: bool = False, same_layout: bool = False) -> Callable[..., Case]:
    """One-layer feature / relation terms with their default (published) settings."""

    def build(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
        seed = seeded(data)
        student_shape, teacher_shape = feature_shapes(data, same, maps=maps, same_layout=same_layout)
        student = values(data, student_shape, dtype, large)
        teacher = student.clone() if same else values(data, teacher_shape, dtype, large)
        return Case(sized(name, TERMS[name](), student, teacher, dtype), student, teacher, seed=seed)

    return build


def vid_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """VID with per-channel variances drawn in softplus(-4)..softplus(4) ~ 0.018..4, so log sigma^2 < 0 occurs."""
    case = feature_case("vid", same_layout=True)(data, dtype, same, large)
    channels = case.teacher.shape[1]
    raw = data.draw(hnp.arrays(np.float64, (channels,), elements=weight(-4.0, 4.0)), label="raw_variance")
    with torch.no_grad():
        case.term.raw_variance.copy_(torch.from_numpy(raw))
    return case


def crd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    seed = seeded(data)
    student_shape, teacher_shape = feature_shapes(data, same)
    batch = student_shape[0]
    num_samples = integer(data, batch, 24, "num_samples")
    term = TERMS["crd"](
        feat_dim=integer(data, 2, 8, "feat_dim"),
        nce_k=integer(data, 1, 8, "nce_k"),
        nce_t=data.draw(st.sampled_from([0.07, 0.2, 0.5]), label="nce_t"),
    )
    term.setup_data(num_samples, "loss.terms.crd")
    student = values(data, student_shape, dtype, large)
    teacher = student.clone() if same else values(data, teacher_shape, dtype, large)
    term = sized("crd", term, student, teacher, dtype).eval()  # eval: the memory banks stay as they are
    index = data.draw(hnp.arrays(np.int64, (batch,), elements=st.integers(0, num_samples - 1)), label="index")
    return Case(term, student, teacher, extra={"index": torch.from_numpy(index)}, seed=seed)


def reviewkd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """1..3 stages of 1-D maps; channels and lengths differ per stage and between student and teacher."""
    seed = seeded(data)
    batch, stages = batch_size(data), integer(data, 1, 3, "stages")

    def stage_shape() -> tuple[int, int, int]:
        return batch, integer(data, 1, 4, "channels"), integer(data, 1, 8, "length")

    student_shapes = [stage_shape() for _ in range(stages)]
    teacher_shapes = student_shapes if same else [stage_shape() for _ in range(stages)]
    student = [values(data, shape, dtype, large) for shape in student_shapes]
    teacher = [s.clone() for s in student] if same else [values(data, shape, dtype, large) for shape in teacher_shapes]
    layers = [f"stage{i}" for i in range(stages)]
    term = TERMS["reviewkd"](layers, layers, mid_channels=integer(data, 1, 4, "mid_channels"))
    return Case(sized("reviewkd", term, student, teacher, dtype), student, teacher, seed=seed)


def ctkd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """CTKD with its temperature logit drawn in [-4, 4] (tau in ~(1.4, 20.6)) at a drawn epoch of its curriculum."""
    batch, classes = batch_size(data), integer(data, 2, 12, "classes")
    term = TERMS["ctkd"](init=data.draw(weight(-4.0, 4.0), label="init")).to(dtype)
    term.start_epoch(integer(data, 0, 20, "epoch"))
    student = values(data, (batch, classes), dtype, large)
    teacher = student.clone() if same else values(data, (batch, classes), dtype, large)
    return Case(term, student, teacher)


def mlkd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """MLKD with 1..3 of its temperatures (the confidence masks depend on the teacher only)."""
    batch, classes = batch_size(data), integer(data, 2, 12, "classes")
    temperatures = data.draw(st.lists(st.sampled_from([1.0, 2.0, 4.0, 6.0]), min_size=1, max_size=3), label="temps")
    student = values(data, (batch, classes), dtype, large)
    teacher = student.clone() if same else values(data, (batch, classes), dtype, large)
    return Case(TERMS["mlkd"](temperatures=temperatures), student, teacher)


class Headed(nn.Module):
    """A model reduced to what SDD and WKD-L look up: its linear classifier ``head``."""

    def __init__(self, features: int, classes: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.head = nn.Linear(features, classes).to(dtype)


def sdd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """SDD on 1-D or 2-D maps of one spatial size (1..6), its published scales, heads of 2..12 classes; ``same``:
    one map and one classifier for both."""
    seed = seeded(data)
    batch, classes, rank = batch_size(data), integer(data, 2, 12, "classes"), data.draw(st.sampled_from([3, 4]))
    spatial = (integer(data, 1, 6, "size"),) * (rank - 2)
    channels = [integer(data, 1, 6, "channels") for _ in range(2)]
    student = values(data, (batch, channels[0], *spatial), dtype, large)
    teacher = student.clone() if same else values(data, (batch, channels[1], *spatial), dtype, large)
    heads = [Headed(channels[0], classes, dtype)]
    heads.append(heads[0] if same else Headed(channels[1], classes, dtype))
    term = TERMS["sdd"](temperature=temperature(data))
    term.bind_models({"student": heads[0], "teacher": heads[1]}, "loss.terms.sdd")
    labels = st.integers(-1, classes - 1)
    targets = data.draw(st.none() | hnp.arrays(np.int64, (batch,), elements=labels), label="targets")
    return Case(term, student, teacher, None if targets is None else torch.from_numpy(targets), seed=seed)


def wkd_l_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """WKD-L as the other logit terms, with the teacher's classifier (2..8 features per class) bound."""
    case = logit_case("wkd_l")(data, dtype, same, large)
    seeded(data)
    classes = case.teacher.shape[1]
    case.term.bind_models({"teacher": Headed(integer(data, 2, 8, "features"), classes, dtype)}, "loss.terms.wkd_l")
    return case


def map_pair(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> tuple[Tensor, Tensor]:
    """Student and teacher 1-D or 2-D maps of one spatial size (2..4 per side: >= 2 positions), 1..6 channels each."""
    batch, rank = batch_size(data), data.draw(st.sampled_from([3, 4]), label="rank")
    spatial = tuple(integer(data, 2, 4, "size") for _ in range(rank - 2))
    student = values(data, (batch, integer(data, 1, 6, "channels"), *spatial), dtype, large)
    if same:
        return student, student.clone()
    return student, values(data, (batch, integer(data, 1, 6, "channels"), *spatial), dtype, large)


def map_case(name: str) -> Callable[..., Case]:
    """ICKD, NST and WKD-F with their published settings on a pair of maps of one layout."""

    def build(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
        seed = seeded(data)
        student, teacher = map_pair(data, dtype, same, large)
        return Case(sized(name, TERMS[name](), student, teacher, dtype), student, teacher, seed=seed)

    return build


def srd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """SRD with a teacher classifier of 2..12 classes on the teacher map's spatial mean; the teacher's logits drawn."""
    seed = seeded(data)
    student, teacher = map_pair(data, dtype, same, large)
    classes = integer(data, 2, 12, "classes")
    logits = values(data, (teacher.shape[0], classes), dtype, large)
    term = TERMS["srd"](student_layer="s", teacher_layer="t")
    term.bind_models({"teacher": Headed(teacher.shape[1], classes, dtype)}, "loss.terms.srd")
    return Case(sized("srd", term, student, [teacher, logits], dtype), student, [teacher, logits], seed=seed)


def ofd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """OFD on 1..3 pairs of pre-ReLU maps (margins from the batch statistics: no BatchNorm bound)."""
    seed = seeded(data)
    pairs = [map_pair(data, dtype, same, large) for _ in range(integer(data, 1, 3, "pairs"))]
    student, teacher = [s for s, _ in pairs], [t for _, t in pairs]
    layers = [f"layer{i}" for i in range(len(pairs))]
    return Case(sized("ofd", TERMS["ofd"](layers, layers), student, teacher, dtype), student, teacher, seed=seed)


def catkd_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """CAT-KD with classifiers of 2..12 classes on the maps' spatial means; ``same``: one map, one classifier."""
    seed = seeded(data)
    student, teacher = map_pair(data, dtype, same, large)
    classes = integer(data, 2, 12, "classes")
    heads = [Headed(student.shape[1], classes, dtype)]
    heads.append(heads[0] if same else Headed(teacher.shape[1], classes, dtype))
    term = TERMS["catkd"](resolution=integer(data, 1, 3, "resolution"))
    term.bind_models({"student": heads[0], "teacher": heads[1]}, "loss.terms.catkd")
    return Case(sized("catkd", term, student, teacher, dtype), student, teacher, seed=seed)


def ft_case(data: st.DataObject, dtype: torch.dtype, same: bool, large: bool) -> Case:
    """FT with its published settings on a pair of maps of one layout (an untrained paraphraser: its encoder's
    factor is what the loss reads either way)."""
    seed = seeded(data)
    student, teacher = map_pair(data, dtype, same, large)
    return Case(sized("ft", TERMS["ft"](), student, teacher, dtype), student, teacher, seed=seed)


#: How to build every term of ``TERMS`` for one example: ``build(data, dtype, same, large) -> Case``.
BUILDERS: dict[str, Callable[..., Case]] = {
    "kd": logit_case("kd"),
    "dkd": logit_case("dkd"),
    "dist": logit_case("dist"),
    "nkd": logit_case("nkd"),
    "wttm": logit_case("wttm"),
    "ctkd": ctkd_case,
    "mlkd": mlkd_case,
    "sdd": sdd_case,
    "wkd_l": wkd_l_case,
    "fitnet": feature_case("fitnet", same_layout=True),  # same shapes -> identity regressor
    "at": feature_case("at", maps=True, same_layout=True),
    "vid": vid_case,
    "rkd": feature_case("rkd"),
    "sp": feature_case("sp"),
    "pkt": feature_case("pkt"),
    "cc": feature_case("cc"),
    "crd": crd_case,
    "reviewkd": reviewkd_case,
    "ickd": map_case("ickd"),
    "nst": map_case("nst"),
    "srd": srd_case,
    "ofd": ofd_case,
    "ft": ft_case,
    "catkd": catkd_case,
    "wkd_f": map_case("wkd_f"),
}


def no_bound(case: Case) -> float:
    return 0.0


def vid_bound(case: Case) -> float:
    """Each element of VID's Gaussian NLL is >= 0.5 log sigma_c^2, so the mean is >= beta/2 * min_c log sigma_c^2
    (negative when some sigma_c^2 < 1: VID is not a non-negative loss)."""
    term: VID = case.term  # type: ignore[assignment]
    variance = F.softplus(term.raw_variance.detach()) + term.eps
    return term.beta * 0.5 * float(torch.log(variance).min())


def pkt_bound(case: Case) -> float:
    """PKT's ``sum_j p^t_ij log((p^t_ij + eps) / (p^s_ij + eps))`` is a KL only for eps = 0; with eps it is
    >= -log(1 + B eps) >= -B eps per row (Jensen), so the mean over B^2 entries is >= -eps, times beta.
    (``test_pkt_compare_can_be_slightly_negative`` shows it does go below 0.)"""
    term: PKT = case.term  # type: ignore[assignment]
    return -term.beta * term.eps


#: A lower bound of every term (0: non-negative). KD, DKD (KLs with weights >= 0), DIST (Pearson distances
#: in [0, 2]), NKD (cross-entropies, gamma >= 0), WTTM (a KL times U > 0), CTKD (a KL), MLKD (KLs and squared
#: differences), SDD (KLs, positive weights), WKD-L (a cross-entropy and a transport cost >= 0), FitNets (MSE), AT, SP,
#: CC (squared differences), RKD (Huber), ReviewKD (sum of HCL = weighted MSEs) and CRD (NCE: -log of ratios
#: < 1, since the noise term K/N > 0) are non-negative; so are ICKD, SRD, OFD, CAT-KD, WKD-F (sums of squares),
#: NST (a squared MMD with a positive-definite kernel) and FT (a mean absolute difference).
LOWER_BOUNDS: dict[str, Callable[[Case], float]] = {name: no_bound for name in TERMS if name not in ("vid", "pkt")}
LOWER_BOUNDS |= {"vid": vid_bound, "pkt": pkt_bound}

#: Terms that are 0 when the student's input equals the teacher's.
ZERO_AT_EQUALITY = {"kd", "dkd", "dist", "ctkd", "mlkd", "sdd", "fitnet", "at", "rkd", "sp", "pkt", "cc"}
ZERO_AT_EQUALITY |= {"nst", "catkd"}  # a squared MMD; one classifier's CAMs of one map
#: ... and those that are not, with the reason.
NOT_ZERO_AT_EQUALITY = {
    # Gaussian NLL with a learned mean regressor mu(s) (not the identity) and a 0.5 log sigma^2 term:
    # its minimum is 0.5 log sigma^2, reached at mu(s) = t, not at s = t.
    "vid": "learned mean regressor and log-variance term",
    # NCE against noise samples from the memory banks: strictly positive for every input.
    "crd": "NCE loss against memory-bank noise samples",
    # The student's stages pass through the ABF fusion modules (convs + BN) before HCL; HCL itself is 0 at
    # equality (test_hcl_is_non_negative_and_zero_at_equality).
    "reviewkd": "student maps go through learned ABF fusion before HCL",
    # Cross-entropies, not KLs: the label's (weighted by the teacher's confidence) and the non-target one.
    "nkd": "cross-entropy terms: the teacher's entropies remain at equality",
    # KL(softmax(z_t / T) || softmax(z_s)): the student is matched to the transformed teacher, 0 only for T = 1.
    "wttm": "the student matches the power-transformed teacher, not the teacher (0 only at T = 1)",
    # The label's cross-entropy as in NKD, and an entropic transport cost: its plan spreads mass off the diagonal.
    "wkd_l": "cross-entropy target term and an entropic transport cost > 0",
    # The student passes through a learned adapter first (ICKD's embedding, SRD's connector, OFD's connectors,
    # WKD-F's projector); each distance is 0 at equality of its own inputs (tests/test_feature_methods_new.py).
    "ickd": "student maps go through the learned 1x1 conv + BN embedding",
    "srd": "student maps go through the learned connector before the teacher's classifier",
    "ofd": "student maps go through the learned connectors, and the teacher is clipped at the margin",
    "wkd_f": "student maps go through the learned projector",
    # The translator and the paraphraser's encoder differ; the loss is 0 at equal normalised factors
    # (tests/test_ft.py::test_zero_at_equal_normalised_factors_and_finite).
    "ft": "student maps go through the learned translator, teacher maps through the paraphraser's encoder",
}
#: DIST is 0 at equality only for non-degenerate batches: the Pearson distance of a constant vector (a uniform
#: softmax row, or a class column equal across the batch) uses cosine_similarity's eps and gives 1, not 0
#: (as in the authors' code). The DIST checks below assume a spread of at least DIST_SPREAD.
DIST_SPREAD = 1e-4


def dist_is_degenerate(term: DistillationTerm, logits: Tensor) -> bool:
    probs = F.softmax(term.prepare(logits) / term.temperature, dim=-1)
    rows = (probs - probs.mean(dim=1, keepdim=True)).norm(dim=1)
    columns = (probs - probs.mean(dim=0, keepdim=True)).norm(dim=0)
    return bool(rows.min() < DIST_SPREAD or columns.min() < DIST_SPREAD)


def test_tables_cover_the_registries() -> None:
    assert set(BUILDERS) == set(TERMS), "add a builder for every term in TERMS"
    assert set(LOWER_BOUNDS) == set(TERMS)
    assert ZERO_AT_EQUALITY | set(NOT_ZERO_AT_EQUALITY) == set(TERMS)
    assert not ZERO_AT_EQUALITY & set(NOT_ZERO_AT_EQUALITY)
    assert set(LOGIT_TERMS) == set(LOGIT_OPTIONS) == {"kd", "dkd", "dist", "nkd", "wttm", "wkd_l"}
    assert set(DIVERGENCE_OPTIONS) == set(DIVERGENCES), "add the options of every divergence in DIVERGENCES"


# ------------------------------------------------------------------------------------ classifier terms
@pytest.mark.parametrize("name", TERM_NAMES)
@SETTINGS
@given(data=st.data())
def test_term_is_finite_for_finite_inputs(name: str, data: st.DataObject) -> None:
    """float32, values in [-20, 20] with (when drawn) +-80 entries: the term is a finite scalar."""
    case = BUILDERS[name](data, torch.float32, same=False, large=data.draw(st.booleans(), label="large"))
    assert isinstance(case.term, TERMS[name])
    value = case()
    assert value.shape == () and value.dtype == torch.float32
    assert torch.isfinite(value), f"{name} = {value.item()}"


@pytest.mark.parametrize("name", TERM_NAMES)
@SETTINGS
@given(data=st.data())
def test_term_is_bounded_below(name: str, data: st.DataObject) -> None:
    """float64: the term is >= its theoretical lower bound (0 for all but VID and PKT) - NONNEG_ATOL."""
    case = BUILDERS[name](data, torch.float64, same=data.draw(st.booleans(), label="same"), large=True)
    value = case().item()
    bound = LOWER_BOUNDS[name](case)
    assert math.isfinite(value) and value >= bound - NONNEG_ATOL, f"{name} = {value} < {bound}"


@pytest.mark.parametrize("name", sorted(ZERO_AT_EQUALITY))
@SETTINGS
@given(data=st.data())
def test_term_is_zero_when_student_equals_teacher(name: str, data: st.DataObject) -> None:
    """float64, identical student and teacher inputs (for FitNets: the identity regressor) give |L| <= ZERO_ATOL."""
    case = BUILDERS[name](data, torch.float64, same=True, large=data.draw(st.booleans(), label="large"))
    if name == "fitnet":
        assert isinstance(case.term.regressor, nn.Identity)
    if name == "dist":
        assume(not dist_is_degenerate(case.term, case.student))
    value = case().item()
    assert abs(value) <= ZERO_ATOL, f"{name}(x, x) = {value}"


def argmax_is_robust(logits: Tensor, gap: float = 1e-6) -> bool:
    """Whether every logit either ties the row's maximum exactly or is more than ``gap`` below it, so adding a
    constant cannot merge a near-tie by rounding and move the argmax (which DKD uses for unlabelled rows)."""
    below = logits.max(dim=-1, keepdim=True).values - logits
    return bool(((below == 0) | (below > gap)).all())


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
@pytest.mark.parametrize("name", LOGIT_TERMS)
@SETTINGS
@given(data=st.data())
def test_logit_term_ignores_a_per_sample_shift(name: str, side: str, data: st.DataObject) -> None:
    """float64: adding a constant c_b in [-50, 50] to every logit of sample b (student, teacher or both) leaves
    KD / DKD / DIST / NKD / WTTM / WKD-L (standardized or not) unchanged within SHIFT_ATOL + SHIFT_RTOL * |L|."""
    case = BUILDERS[name](data, torch.float64, same=False, large=data.draw(st.booleans(), label="large"))
    batch = case.student.shape[0]
    shift = values(data, (batch, 1), torch.float64) * 2.5
    student = case.student + shift if side in ("student", "both") else case.student
    teacher = case.teacher + shift if side in ("teacher", "both") else case.teacher
    if name in ("dkd", "nkd", "wkd_l"):
        assume(argmax_is_robust(case.teacher))
    if name == "dist":
        assume(not dist_is_degenerate(case.term, case.student) and not dist_is_degenerate(case.term, case.teacher))
    expected, value = case().item(), case(student, teacher).item()
    assert abs(value - expected) <= SHIFT_ATOL + SHIFT_RTOL * abs(expected), f"{name}: {value} != {expected}"


@SETTINGS
@given(data=st.data())
def test_hcl_is_non_negative_and_zero_at_equality(data: st.DataObject) -> None:
    """ReviewKD's hierarchical context loss on same-shaped 1-D maps, float64."""
    shape = (batch_size(data), integer(data, 1, 4, "channels"), integer(data, 1, 9, "length"))
    student, teacher = values(data, shape, torch.float64, True), values(data, shape, torch.float64, True)
    assert hcl(student, teacher).item() >= 0.0
    assert abs(hcl(teacher, teacher).item()) <= ZERO_ATOL


def test_pkt_compare_can_be_slightly_negative() -> None:
    """Why PKT's lower bound is -beta * eps, not 0: with p^s = p^t (1 + B eps) - eps the eps-smoothed
    'KL' is below 0 (by O(eps^2) here)."""
    pkt = PKT()
    teacher = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    student = teacher * (1 + 2 * pkt.eps) - pkt.eps
    value = pkt.compare(student, teacher).item()
    assert -pkt.eps <= value < 0.0


# --------------------------------------------------------------------------------- RKD angle cosines
@SETTINGS
@given(data=st.data())
def test_rkd_angle_cosines_are_cosines(data: st.DataObject) -> None:
    """The angle terms RKD compares are cosines: in [-1, 1] (+1e-9, float64) for distinct samples on a 0.4
    grid in [-20, 20] (float32 close samples: see NEAR_DUPLICATES below)."""
    batch, width = integer(data, 3, 8, "batch"), integer(data, 1, 12, "features")
    row = st.lists(st.integers(-50, 50), min_size=width, max_size=width)
    rows = data.draw(st.lists(row, min_size=batch, max_size=batch, unique_by=tuple), label="rows")
    features = torch.tensor(rows, dtype=torch.float64) * 0.4
    assert angle_cosines(features).abs().max().item() <= 1.0 + 1e-9


#: float32 batches whose angle cosines left [-1, 1] while angle_cosines expanded the Gram matrix
#: (||a||^2 + ||b||^2 - 2 a.b cancels catastrophically for close samples); now computed from differences.
NEAR_DUPLICATES = {
    # hypothesis' shrunk example: 1-D features, d(16.308594, 16.25) = 0.0586 comes out as 0.0585, |cos| = 1.0022
    # (RKD against OTHER: 5.5366 in float32, 5.5258 in float64).
    "shrunk": [[0.0], [16.308594], [16.25]],
    # two samples 1e-3 apart with norms ~14: the distance comes out as the 1e-6 clamp, |cos| = 744
    # (RKD against OTHER: 5517.4 in float32, 11.64 in float64).
    "near_duplicates": [[10.0, 10.0], [10.001, 10.0], [0.0, 1.0]],
}
OTHER = [[0.0, 1.0], [1.0, 0.0], [1.0, 1.0]]


@pytest.mark.parametrize("rows", list(NEAR_DUPLICATES.values()), ids=list(NEAR_DUPLICATES))
def test_rkd_angle_cosines_of_close_samples_in_float32(rows: list[list[float]]) -> None:
    assert angle_cosines(torch.tensor(rows)).abs().max().item() <= 1.0 + 1e-5
    single, double = (
        RKD()(torch.tensor(rows, dtype=t), torch.tensor(OTHER, dtype=t)).item() for t in (torch.float32, torch.float64)
    )
    assert single == pytest.approx(double, rel=1e-3)


def test_rkd_of_close_samples_is_fine_in_float64() -> None:
    """The same batch in float64: cosines in [-1, 1] and the RKD value float32 must now match."""
    rows, other = torch.tensor(NEAR_DUPLICATES["near_duplicates"]), torch.tensor(OTHER)
    assert angle_cosines(rows.double()).abs().max().item() <= 1.0 + 1e-9
    assert RKD()(rows.double(), other.double()).item() == pytest.approx(11.64, abs=0.01)


def test_rkd_of_a_wide_teacher_is_computed_in_its_span() -> None:
    """A teacher wider than the batch (an unpooled feature map) is read in an orthonormal basis of its rows' span
    (float64 QR, relations.span_coordinates): the same RKD value and student gradient as the float64 computation
    on the full width, near-duplicate teacher samples included."""
    torch.manual_seed(0)
    teacher = torch.randn(6, 2, 40)
    teacher[1] = teacher[0] + 1e-3  # two samples 1e-3 apart in 80 dimensions
    student = torch.randn(6, 5)
    coordinates = span_coordinates(teacher.flatten(1))
    assert coordinates.shape == (6, 6) and coordinates.dtype == torch.float64
    for relation in (pairwise_distances, angle_cosines):
        torch.testing.assert_close(relation(coordinates), relation(teacher.flatten(1).double()), rtol=0, atol=1e-9)

    def value_and_grad(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = student.clone().requires_grad_()
        value = RKD()(leaf, teacher)
        value.backward()
        return value.detach().double(), leaf.grad.double()

    # reference: the full width in float64 (a teacher needing a gradient is never reduced)
    expected = value_and_grad(student.double(), teacher.double().requires_grad_())
    for got, want in zip(value_and_grad(student, teacher), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- token divergences
#: Constructor arguments of every divergence, drawn per example (beta in [0, 1], alpha in [0, 1)).
DIVERGENCE_OPTIONS: dict[str, dict[str, st.SearchStrategy]] = {
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": st.floats(0.0, 1.0)},
    "skl": {"alpha": st.floats(0.0, 1.0, exclude_max=True)},
    "srkl": {"alpha": st.floats(0.0, 1.0, exclude_max=True)},
    "tvd": {},
}


def divergence(name: str, data: st.DataObject) -> TokenDivergence:
    kwargs = {key: data.draw(strategy, label=key) for key, strategy in DIVERGENCE_OPTIONS[name].items()}
    return DIVERGENCES[name](temperature=temperature(data), **kwargs)


def token_logits(data: st.DataObject, dtype: torch.dtype, large: bool) -> tuple[Tensor, Tensor]:
    shape = (integer(data, 1, 8, "tokens"), integer(data, 2, 12, "vocab"))
    return values(data, shape, dtype, large), values(data, shape, dtype, large)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@SETTINGS
@given(data=st.data())
def test_divergence_is_finite(name: str, data: st.DataObject) -> None:
    """float32 logits in [-20, 20] with (when drawn) +-80 entries: one finite float32 value per token."""
    div = divergence(name, data)
    student, teacher = token_logits(data, torch.float32, large=data.draw(st.booleans(), label="large"))
    value = div(student, teacher)
    assert value.shape == student.shape[:1] and value.dtype == torch.float32
    assert torch.isfinite(value).all(), value


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@SETTINGS
@given(data=st.data())
def test_divergence_is_non_negative(name: str, data: st.DataObject) -> None:
    """float64: KL, reverse KL, generalized JSD, skew KL / RKL and TV are >= -NONNEG_ATOL per token."""
    student, teacher = token_logits(data, torch.float64, large=True)
    value = divergence(name, data)(student, teacher)
    assert (value >= -NONNEG_ATOL).all(), value


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@SETTINGS
@given(data=st.data())
def test_divergence_is_zero_between_equal_distributions(name: str, data: st.DataObject) -> None:
    """float64: D(z, z) is within ZERO_ATOL of 0 per token (every divergence here vanishes at p_s = p_t)."""
    student, _ = token_logits(data, torch.float64, large=True)
    value = divergence(name, data)(student, student.clone())
    assert (value.abs() <= ZERO_ATOL).all(), value


@pytest.mark.parametrize("side", ["student", "teacher", "both"])
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@SETTINGS
@given(data=st.data())
def test_divergence_ignores_a_per_token_shift(name: str, side: str, data: st.DataObject) -> None:
    """float64: a constant c_n in [-50, 50] added to token n's logits (student, teacher or both) changes no
    value by more than SHIFT_ATOL + SHIFT_RTOL * |D|."""
    div = divergence(name, data)
    student, teacher = token_logits(data, torch.float64, large=data.draw(st.booleans(), label="large"))
    shift = values(data, (student.shape[0], 1), torch.float64) * 2.5
    shifted_student = student + shift if side in ("student", "both") else student
    shifted_teacher = teacher + shift if side in ("teacher", "both") else teacher
    expected, value = div(student, teacher), div(shifted_student, shifted_teacher)
    torch.testing.assert_close(value, expected, rtol=SHIFT_RTOL, atol=SHIFT_ATOL)


# ---------------------------------------------------------------------------------- chunked token loss
@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@SETTINGS
@given(data=st.data())
def test_token_loss_is_finite_and_independent_of_the_chunk_size(name: str, data: st.DataObject) -> None:
    """TokenDistillationLoss over random hidden states, heads, labels (-100 anywhere) and teachers (hidden
    states + head, or full logits): finite in float32, and in float64 the chunked sums and the gradients of
    the student's hidden states and head equal the unchunked ones (CHUNK_RTOL, CHUNK_ATOL) for every chunk size."""
    seeded(data)
    batch, length, hidden_size, vocab = (
        integer(data, 1, 3, "batch"),
        integer(data, 2, 6, "length"),
        integer(data, 1, 6, "hidden"),
        integer(data, 2, 10, "vocab"),
    )
    hidden = values(data, (batch, length, hidden_size), torch.float64)
    label = st.one_of(st.just(IGNORE_INDEX), st.integers(0, vocab - 1))
    labels = torch.from_numpy(data.draw(hnp.arrays(np.int64, (batch, length), elements=label), label="labels"))
    head = nn.Linear(hidden_size, vocab, bias=data.draw(st.booleans(), label="bias")).double()
    if data.draw(st.booleans(), label="teacher_as_logits"):
        teacher = {"teacher_logits": values(data, (batch, length, vocab), torch.float64, large=True)}
    else:
        teacher_head = nn.Linear(hidden_size, vocab, bias=False).double()
        teacher_hidden = values(data, (batch, length, hidden_size), torch.float64)
        teacher = {"teacher_hidden": teacher_hidden, "teacher_head": teacher_head}
    div = divergence(name, data)
    alpha = data.draw(st.floats(0.0, 1.0), label="alpha")
    chunk_sizes = data.draw(st.lists(st.integers(1, batch * length + 1), min_size=1, max_size=3), label="chunk_sizes")

    def run(chunk_size: int | None, dtype: torch.dtype) -> tuple[Tensor, Tensor, list[Tensor]]:
        x = hidden.detach().to(dtype, copy=True).requires_grad_()
        model_head = head.to(dtype)  # in place; the weights are float32 values, so the round trip is exact
        model_head.zero_grad(set_to_none=True)
        cast = {key: t.to(dtype) for key, t in teacher.items()}
        out = TokenDistillationLoss(div, alpha=alpha, chunk_size=chunk_size)(x, model_head, labels, **cast)
        out.total.backward()
        # No valid token: the zero loss reaches the weight but not the bias (grad None either way).
        grads = [x.grad, *(torch.zeros_like(p) if p.grad is None else p.grad for p in model_head.parameters())]
        return out.total.detach(), out.count, grads

    total32, count, grads32 = run(chunk_sizes[0], torch.float32)
    assert int(count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert torch.isfinite(total32) and all(torch.isfinite(g).all() for g in grads32)
    reference, _, reference_grads = run(None, torch.float64)
    for chunk_size in chunk_sizes:
        total, _, grads = run(chunk_size, torch.float64)
        torch.testing.assert_close(total, reference, rtol=CHUNK_RTOL, atol=CHUNK_ATOL)
        for got, expected in zip(grads, reference_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=CHUNK_RTOL, atol=CHUNK_ATOL)
