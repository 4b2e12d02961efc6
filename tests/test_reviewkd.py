"""ReviewKD: HCL against a plain re-implementation, the review (deep-to-shallow fusion) order against a
functional re-implementation, gradcheck, bf16, 1-D and 2-D maps, and multi-layer taps by path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import DistillationLoss, ReviewKD
from kd_lightning.losses.features import hcl
from tests import reference_losses as ref
from tests.test_taps import X, module_with

#: Three 1-D stages: student (B, 3, L) at L = 12, 6, 3; teacher (B, 5 / 6 / 7, 12) (sizes differ).
STUDENT_1D = [(4, 3, 12), (4, 3, 6), (4, 3, 3)]
TEACHER_1D = [(4, 5, 12), (4, 6, 12), (4, 7, 12)]


def maps(shapes: list[tuple[int, ...]], seed: int, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype) for shape in shapes]


Shapes = list[tuple[int, ...]]


def sized(student_shapes: Shapes, teacher_shapes: Shapes, dtype: torch.dtype = torch.float64) -> ReviewKD:
    torch.manual_seed(0)
    term = ReviewKD(["a", "b", "c"][: len(student_shapes)], ["a", "b", "c"][: len(teacher_shapes)], beta=2.0,
                    mid_channels=4)  # fmt: skip
    term.setup_shapes(maps(student_shapes, 0), maps(teacher_shapes, 1), "k")
    return term.to(dtype).eval()


@pytest.mark.parametrize("shape", [(3, 2, 40), (3, 2, 3), (2, 3, 7, 5)], ids=["1d", "1d_short", "2d"])
def test_hcl_matches_the_reference(shape: tuple[int, ...]) -> None:
    s, t = maps([shape, shape], 2)
    assert hcl(s, t).item() == pytest.approx(ref.hcl(s.numpy(), t.numpy()), rel=1e-12)
    assert hcl(t, t).item() == 0.0


def plain_review(term: ReviewKD, student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """The review chain written out with functional ops from the ABF weights (BN in eval mode)."""

    def conv_bn(seq: torch.nn.Sequential, x: torch.Tensor, padding: int) -> torch.Tensor:
        conv, bn = seq[0], seq[1]
        x = F.conv1d(x, conv.weight, padding=padding)
        return (x - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps) * bn.weight[
            :, None
        ] + bn.bias[:, None]

    total, residual = 0.0, None
    for i in (2, 1, 0):
        abf = term.abfs[i]
        x = conv_bn(abf.conv1, student[i], 0)
        if residual is not None:
            residual = residual[:, :, torch.arange(x.shape[2]) * residual.shape[2] // x.shape[2]]  # nearest
            gates = torch.sigmoid(F.conv1d(torch.cat([x, residual], 1), abf.att_conv[0].weight, abf.att_conv[0].bias))
            x = x * gates[:, :1] + residual * gates[:, 1:]
        length = teacher[i].shape[2]
        residual = x[:, :, torch.arange(length) * x.shape[2] // length]
        total = total + hcl(conv_bn(abf.conv2, residual, 1), teacher[i])
    return term.beta * total


def test_review_fuses_deep_to_shallow_as_written_out() -> None:
    term = sized(STUDENT_1D, TEACHER_1D)
    student, teacher = maps(STUDENT_1D, 3), maps(TEACHER_1D, 4)
    assert term.abfs[2].att_conv is None and term.abfs[0].att_conv is not None
    assert term(student, teacher).item() == pytest.approx(plain_review(term, student, teacher).item(), rel=1e-10)


def test_gradcheck_in_float64() -> None:
    term = sized(STUDENT_1D, TEACHER_1D)
    student, teacher = maps(STUDENT_1D, 3), maps(TEACHER_1D, 4)
    for s in student:
        s.requires_grad_()
    assert torch.autograd.gradcheck(lambda *s: term(list(s), teacher), tuple(student))


def test_bf16_autocast_stays_finite() -> None:
    term = sized(STUDENT_1D, TEACHER_1D, torch.float32)
    student, teacher = maps(STUDENT_1D, 3, torch.bfloat16), maps(TEACHER_1D, 4, torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = term([s * 30 for s in student], [t * 30 for t in teacher])
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_two_dimensional_maps_of_other_sizes_train() -> None:
    student_shapes, teacher_shapes = [(4, 3, 8, 8), (4, 5, 4, 4)], [(4, 6, 8, 8), (4, 7, 2, 2)]
    term = sized(student_shapes, teacher_shapes, torch.float32).train()
    student = [s.float().requires_grad_() for s in maps(student_shapes, 5)]
    value = term(student, [t.float() for t in maps(teacher_shapes, 6)])
    value.backward()
    assert torch.isfinite(value) and all(s.grad is not None for s in student)


def test_bad_layer_lists_and_ranks_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"same \(non-zero\) length"):
        ReviewKD(["a", "b"], ["a"])
    with pytest.raises(ConfigError, match=r"^k: ReviewKD needs conv maps of one rank"):
        ReviewKD(["a", "b"], ["a", "b"]).setup_shapes(maps([(2, 3, 4), (2, 3)], 0), maps([(2, 3, 4)] * 2, 1), "k")


def test_module_taps_every_listed_layer_and_names_a_wrong_one() -> None:
    term = ReviewKD(student_layers=["stem", "blocks.0", "blocks.1"], teacher_layers=["stem", "blocks.0", "blocks.1"])
    loss = DistillationLoss({"reviewkd": term})
    assert loss.layers("student") == {f"{p}": f"loss.terms.reviewkd.student_layers[{i}]"
                                      for i, p in enumerate(["stem", "blocks.0", "blocks.1"])}  # fmt: skip
    module = module_with({"reviewkd": term})
    module.setup_for(X)
    module.training_step((X, torch.tensor([0, 1, 2, 0, 1])), 0).backward()
    assert all(p.grad is not None for p in term.parameters())
    bad = ReviewKD(student_layers=["stem", "blocks.7"], teacher_layers=["stem", "blocks.1"])
    with pytest.raises(ConfigError, match=r"loss\.terms\.reviewkd\.student_layers\[1\]='blocks\.7'"):
        module_with({"reviewkd": bad})
