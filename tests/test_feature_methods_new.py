"""ICKD, NST, SRD, OFD, CAT-KD and WKD-F against transcriptions of their authors' code (tests/reference_losses.py):
value and gradients (student input and the learned connector) in float64 to a relative 1e-5, the documented
relations where we differ, and their integration in DistillationModule (adapters trained and checkpointed,
the models' own classifiers / BatchNorms read but never owned)."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import CATKD, ICKD, NST, OFD, SRD, WKDF, DistillationLoss
from kd_lightning.losses.classifier_features import class_activation_maps
from kd_lightning.losses.overhaul import margin_from_batchnorm
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import ConvNet1D
from tests import reference_losses as ref

REL = 1e-5


def randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).requires_grad_()


def assert_same(ours: Tensor, theirs: Tensor, inputs: list[Tensor]) -> None:
    """Equal values and gradients with respect to ``inputs``, to a relative REL (float64)."""
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), rel=REL, abs=1e-12)
    for mine, other in zip(torch.autograd.grad(ours, inputs), torch.autograd.grad(theirs, inputs), strict=True):
        scale = other.abs().max().item()
        torch.testing.assert_close(mine, other, rtol=REL, atol=REL * scale)


class Head(nn.Module):
    """A stand-in model: only its named modules matter to bind_models."""

    def __init__(self, channels: int, classes: int, **modules: nn.Module) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, classes).double()
        for name, module in modules.items():
            self.add_module(name, module.double())


# ------------------------------------------------------------------------------- against the authors' code
def test_ickd_matches_the_authors_code() -> None:
    student, teacher = randn(4, 3, 5, 5, seed=0), randn(4, 6, 4, 3, seed=1, scale=2.0)  # spatial sizes differ
    term = ICKD(beta=2.5)
    term.setup_shapes(student, teacher, "k")
    term.double()
    weight = term.embed[0].weight
    theirs = 2.5 * ref.ickd_authors(student, teacher, weight)
    assert_same(term(student, teacher), theirs, [student, weight])


@pytest.mark.parametrize(
    ("s_size", "t_size"), [(4, 4), (6, 3), (2, 5)], ids=["same", "student-larger", "teacher-larger"]
)
def test_nst_matches_the_authors_code(s_size: int, t_size: int) -> None:
    student, teacher = randn(3, 4, s_size, s_size, seed=2), randn(3, 7, t_size, t_size, seed=3)
    term = NST(beta=50.0)
    term.setup_shapes(student, teacher, "k")
    assert_same(term(student, teacher), 50.0 * ref.nst_authors(student, teacher), [student])


def test_nst_is_zero_at_equality_and_pools_one_dimensional_maps() -> None:
    features = randn(3, 5, 8, seed=4)
    assert NST()(features, features).item() == pytest.approx(0.0, abs=1e-12)
    student, teacher = randn(3, 4, 8, seed=5), randn(3, 2, 4, seed=6)
    as_2d = NST()(student.unsqueeze(-1), teacher.unsqueeze(-1))  # (L, 1) maps: pooled the same way
    pooled = torch.nn.functional.adaptive_avg_pool1d(student, 4)
    assert NST()(student, teacher).item() == pytest.approx(NST()(pooled, teacher).item(), rel=1e-12)
    assert as_2d.item() == pytest.approx(NST()(pooled, teacher).item(), rel=1e-12)


def sized_srd(student: Tensor, teacher: Tensor, head: nn.Linear) -> SRD:
    term = SRD(student_layer="s", teacher_layer="t", teacher_head="head")
    term.bind_models({"teacher": Head(1, 1, head=head)}, "k")
    term.setup_shapes(student, [teacher, torch.zeros(1)], "k")
    return term.double()


def test_srd_matches_the_authors_code() -> None:
    student, teacher, logits = randn(4, 3, 4, 4, seed=7), randn(4, 6, 4, 4, seed=8), randn(4, 5, seed=9)
    torch.manual_seed(0)
    head = nn.Linear(6, 5)  # on the spatial mean, as the CIFAR models' avgpool + fc
    term = sized_srd(student, teacher, head)
    conv = term.connector[0].weight
    theirs = ref.srd_authors(student, teacher, logits, conv, term._classifier[0])
    assert_same(term(student, [teacher, logits]), theirs, [student, conv])
    assert not any(p is head.weight for p in term.parameters()) and "head" not in str(list(term.state_dict()))


def test_srd_through_a_flattening_head_is_that_head_on_the_connected_map() -> None:
    """ConvNet1D's head reads the flattened map: the student's part is head(flatten(c(F_s)))."""
    student, teacher, logits = randn(4, 3, 6, seed=10), randn(4, 2, 6, seed=11), randn(4, 5, seed=12)
    head = nn.Linear(12, 5).double()
    term = sized_srd(student, teacher, head)
    mapped = term.connector(student)
    statistics = (mapped.mean(2) - teacher.mean(2)).pow(2).mean()
    expected = statistics + (head(mapped.flatten(1)) - logits).pow(2).mean()
    assert term(student, [teacher, logits]).item() == pytest.approx(expected.item(), rel=1e-12)


def test_ofd_margin_is_the_authors_get_margin_from_bn() -> None:
    bn = nn.BatchNorm2d(64)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(64) * 2)
        bn.bias.copy_(torch.linspace(-4, 12, 64))  # large positive means take the -3 s branch
    ours = margin_from_batchnorm(bn.weight, bn.bias)
    theirs = ref.ofd_margin_authors(bn)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert (theirs == -3 * bn.weight.detach().double().abs()).any() and (ours < 0).all()


def bn_teacher(*channels: int) -> nn.Module:
    """A model of affine BatchNorms with random weights (signs included) and biases."""
    bns = {f"bn{i}": nn.BatchNorm2d(c) for i, c in enumerate(channels)}
    generator = torch.Generator().manual_seed(13)
    for bn in bns.values():
        with torch.no_grad():
            bn.weight.copy_(torch.randn(bn.num_features, generator=generator) * 1.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=generator))
    return Head(1, 1, **bns)


def test_ofd_matches_the_authors_code() -> None:
    student = [randn(4, 3, 6, 6, seed=14), randn(4, 5, 3, 3, seed=15)]
    teacher = [randn(4, 6, 6, 6, seed=16), randn(4, 2, 3, 3, seed=17)]
    model = bn_teacher(6, 2)
    term = OFD(["a", "b"], ["bn0", "bn1"], beta=1e-3)
    term.bind_models({"teacher": model}, "k")
    term.setup_shapes(student, teacher, "k")
    term.double()
    weights = [connector[0].weight for connector in term.connectors]
    margins = [ref.ofd_margin_authors(model.bn0), ref.ofd_margin_authors(model.bn1)]
    theirs = 1e-3 * ref.ofd_authors(student, teacher, weights, margins)
    assert_same(term(student, teacher), theirs, [*student, *weights])
    assert not any(k.startswith("margin") for k in term.state_dict())  # recomputed from the teacher at setup


def test_ofd_margin_without_a_batchnorm_comes_from_the_batch_statistics() -> None:
    """The documented fallback: for a BatchNorm's training-mode output the batch statistics are its bias and
    (up to its epsilon) |weight|, so both routes give nearly the same margin."""
    bn = bn_teacher(6).bn0.train()
    output = bn(torch.randn(64, 6, 5, 5, dtype=torch.float64) * 3 + 1).detach()
    student = [torch.randn(64, 2, 5, 5, dtype=torch.float64)]
    from_bn, from_batch = OFD(["s"], ["bn0"]), OFD(["s"], ["other"])
    from_bn.bind_models({"teacher": Head(1, 1, bn0=bn)}, "k")
    from_batch.bind_models({"teacher": Head(1, 1, other=nn.Identity())}, "k")
    for term in (from_bn, from_batch):
        term.setup_shapes(student, [output], "k")
    torch.testing.assert_close(from_batch.margin0, from_bn.margin0, rtol=1e-3, atol=1e-4)


def test_ofd_partial_l2_skips_a_student_below_a_non_positive_target() -> None:
    term = OFD(["s"], ["t"])
    term.setup_shapes([torch.zeros(1, 1, 2)], [torch.tensor([[[-1.0, 1.0]]])], "k")
    with torch.no_grad():
        term.margin0.fill_(-0.5)
        term.connectors[0][0].weight.fill_(1.0)
    term.connectors.eval()  # BN in eval with fresh statistics: the identity (up to its epsilon)
    teacher = torch.tensor([[[-1.0, -1.0, 2.0, 0.5]]])
    below = term([torch.tensor([[[-3.0, -0.2, 2.0, 0.5]]])], [teacher])  # -3 < max(-1, -0.5): free; -0.2 > -0.5
    assert below.item() == pytest.approx(1e-3 * (0.3**2), rel=1e-4)


def test_catkd_matches_the_authors_code() -> None:
    student, teacher = randn(4, 3, 6, 6, seed=18), randn(4, 5, 4, 4, seed=19)
    torch.manual_seed(1)
    s_model, t_model = Head(3, 7), Head(5, 7)
    term = CATKD(student_layer="s", teacher_layer="t", student_head="fc", teacher_head="fc", beta=400.0)
    term.bind_models({"student": s_model, "teacher": t_model}, "k")
    term.setup_shapes(student, teacher, "k")
    w_s = s_model.fc.weight
    for normalize in (True, False):
        term.normalize = normalize
        theirs = 400.0 * ref.catkd_authors(student, teacher, w_s, t_model.fc.weight, 2, normalize)
        assert_same(term(student, teacher), theirs, [student, w_s])  # the student's classifier learns too


@pytest.mark.parametrize("flatten", [False, True], ids=["mean-head", "flatten-head"])
def test_class_activation_maps_average_to_the_logits_without_bias(flatten: bool) -> None:
    features = randn(3, 4, 5, seed=20)
    head = nn.Linear(4 * 5 if flatten else 4, 6).double()
    logits = head(features.flatten(1) if flatten else features.mean(2))
    cams = class_activation_maps(features, head)
    torch.testing.assert_close(cams.mean(2), logits - head.bias, rtol=1e-12, atol=1e-12)


def test_catkd_is_zero_for_the_same_features_and_classifier() -> None:
    features, model = randn(3, 4, 6, seed=21), Head(4, 5)
    term = CATKD(student_head="fc", teacher_head="fc")
    term.bind_models({"student": model, "teacher": model}, "k")
    assert term(features, features).item() == pytest.approx(0.0, abs=1e-12)


def test_wkd_f_matches_the_authors_code_and_decays_on_their_schedule() -> None:
    student, teacher = randn(4, 3, 5, 5, seed=22), randn(4, 6, 5, 5, seed=23)
    term = WKDF(beta=0.08, mean_weight=4.0, decay_start_epoch=150, decay_end_epoch=240)
    term.setup_shapes(student, teacher, "k")
    term.double()
    conv = term.projector[0]
    theirs = 0.08 * ref.wkd_f_authors(student, teacher, conv, 4.0)
    assert_same(term(student, teacher), theirs, [student, conv.weight, conv.bias])
    for epoch in (0, 149, 150, 194, 239, 300):  # 0-based; the authors' epoch is epoch + 1
        term.start_epoch(epoch)
        authors_epoch = epoch + 1
        progress = min(max(authors_epoch - 150, 0), 90) / 90
        expected = 1.0 if authors_epoch <= 150 else 0.5 * (1 + math.cos(progress * math.pi))
        assert term.schedule == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: NST(degree=0), r"^loss\.terms\.nst\.degree=0"),
        (lambda: WKDF(decay_start_epoch=10), r"^loss\.terms\.wkd_f\.decay_start_epoch=10"),
        (lambda: WKDF(decay_start_epoch=20, decay_end_epoch=10), r"^loss\.terms\.wkd_f\.decay_start_epoch=20"),
        (lambda: CATKD(resolution=0), r"^loss\.terms\.catkd\.resolution=0"),
        (lambda: OFD(["a"], ["b"], teacher_bns=["x", "y"]), r"^loss\.terms\.ofd\.teacher_bns has 2 entries"),
    ],
)
def test_bad_options_fail_in_one_line(build: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build()  # type: ignore[operator]


def test_bad_shapes_and_heads_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^k: NST pools the larger map"):
        NST().setup_shapes(torch.zeros(2, 3, 4, 2), torch.zeros(2, 3, 2, 4), "k")
    with pytest.raises(ConfigError, match=r"^k: ICKD needs conv maps"):
        ICKD().setup_shapes(torch.zeros(2, 3), torch.zeros(2, 3, 4), "k")
    with pytest.raises(ConfigError, match=r"^k\.teacher_head='bn' is a BatchNorm1d, not an nn\.Linear"):
        SRD(teacher_head="bn").bind_models({"teacher": Head(1, 1, bn=nn.BatchNorm1d(2))}, "k")
    srd = SRD(teacher_head="fc")
    srd.bind_models({"teacher": Head(7, 3)}, "k")
    with pytest.raises(ConfigError, match=r"^k\.teacher_head='fc' takes 7 features"):
        srd.setup_shapes(torch.zeros(2, 3, 4), [torch.zeros(2, 5, 4), torch.zeros(2, 3)], "k")
    with pytest.raises(ConfigError, match=r"^k: SRD needs the teacher's classifier"):
        SRD().setup_shapes(torch.zeros(2, 3, 4), [torch.zeros(2, 5, 4), torch.zeros(2, 3)], "k")


# ------------------------------------------------------------------------------ in DistillationModule
X = torch.randn(6, 1, 40)
LAST, CONVS = "features.5", ["features.0", "features.2", "features.4"]
TERMS = {
    "ickd": lambda: ICKD(student_layer=LAST, teacher_layer=LAST),
    "nst": lambda: NST(student_layer=LAST, teacher_layer=LAST),
    "srd": lambda: SRD(student_layer=LAST, teacher_layer=LAST),
    "ofd": lambda: OFD(CONVS, ["features.1", "features.4", "features.7"]),  # the BN teacher's BatchNorms
    "catkd": lambda: CATKD(student_layer=LAST, teacher_layer="features.8"),
    "wkd_f": lambda: WKDF(student_layer=LAST, teacher_layer="features.8"),
}
ADAPTERS = {"ickd": "embed", "srd": "connector", "ofd": "connectors", "wkd_f": "projector"}


def module_with(name: str) -> DistillationModule:
    torch.manual_seed(0)
    student = ConvNet1D(num_classes=3, channels=4)
    teacher = ConvNet1D(num_classes=3, channels=8, batch_norm=True)
    teacher = teacher if name in ("ofd", "catkd", "wkd_f") else ConvNet1D(num_classes=3, channels=8)
    return DistillationModule(
        student=student,
        teacher=teacher,
        loss=DistillationLoss({name: TERMS[name]()}, alpha=0.5),
        optimizer=partial(torch.optim.SGD, lr=0.1),
        num_classes=3,
    )


@pytest.mark.parametrize("name", sorted(TERMS))
def test_term_trains_in_the_module_with_its_adapters_checkpointed(name: str) -> None:
    module = module_with(name)
    module.setup_for(X)
    loss = module.training_step((X, torch.tensor([0, 1, 2, 0, 1, 2])), 0)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in module.student.parameters())
    names = set(module.state_dict())
    if name in ADAPTERS:
        adapter = getattr(module.loss.terms[name], ADAPTERS[name])
        in_optimizer = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
        assert {id(p) for p in adapter.parameters()} <= in_optimizer
        assert all(p.grad is not None for p in adapter.parameters())
        assert any(n.startswith(f"loss.terms.{name}.{ADAPTERS[name]}.") for n in names)
    teacher_params = {id(p) for p in module.teacher.parameters()}
    assert not teacher_params & {id(p) for p in module.loss.parameters()}
    assert all(p.grad is None for p in module.teacher.parameters())


def test_ofd_margins_come_from_the_bound_teachers_batchnorms() -> None:
    module = module_with("ofd")
    module.setup_for(X)
    term, bn = module.loss.terms["ofd"], module.teacher.features[4]
    expected = margin_from_batchnorm(bn.weight, bn.bias).float().view(1, -1, 1)
    torch.testing.assert_close(term.margin1, expected)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_bf16_autocast_stays_finite_in_the_module(name: str) -> None:
    module = module_with(name)
    module.setup_for(X)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = {"student": module.student_outputs(X * 30), "teacher": module.teacher_outputs(X * 30)}
        value = module.loss(outputs, torch.tensor([0, 1, 2, 0, 1, 2])).parts[name]
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_a_wrong_classifier_path_fails_when_the_module_is_built() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.srd\.teacher_head='fc' is not a module of ConvNet1D"):
        DistillationModule(
            student=ConvNet1D(num_classes=3, channels=4),
            teacher=ConvNet1D(num_classes=3, channels=8),
            loss=DistillationLoss({"srd": SRD(student_layer=LAST, teacher_layer=LAST, teacher_head="fc")}),
            optimizer=partial(torch.optim.SGD, lr=0.1),
            num_classes=3,
        )
