"""CRD: value and gradient against a plain re-implementation, the memory bank's update, Z estimation,
checkpointing, optimizer exclusion, index routing and the data.return_index switch."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import MNIST1DDataModule
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import CRD, DistillationLoss, KLDivergence
from kd_lightning.methods.kd import DistillationModule
from tests import reference_losses as ref
from tests.test_taps import Net, X

N, K, B = 11, 5, 4
INDEX = torch.tensor([3, 0, 10, 7])


def sized_crd(dtype: torch.dtype = torch.float64, beta: float = 0.8) -> CRD:
    """A CRD for (B, 3, 2) student and (B, 5) teacher features over N samples, Z fixed (not estimated)."""
    torch.manual_seed(0)
    term = CRD(beta=beta, feat_dim=6, nce_k=K, nce_t=0.5, num_samples=N)
    term.setup_data(None, "k")
    term.setup_shapes(torch.zeros(B, 3, 2), torch.zeros(B, 5), "k")
    term = term.to(dtype)
    term.z_student.fill_(7.0)
    term.z_teacher.fill_(13.0)
    return term.eval()


def features(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 2, generator=generator).to(dtype), torch.randn(B, 5, generator=generator).to(dtype)


def contrast() -> np.ndarray:
    """The indices CRD draws after ``torch.manual_seed(2)``: the positive, then K uniform negatives."""
    torch.manual_seed(2)
    return torch.cat([INDEX[:, None], torch.randint(N, (B, K))], dim=1).numpy()


def reference(term: CRD, s: np.ndarray, t: np.ndarray) -> float:
    heads = {
        "ws": term.embed_student.weight.detach().numpy(),
        "bs": term.embed_student.bias.detach().numpy(),
        "wt": term.embed_teacher.weight.detach().numpy(),
        "bt": term.embed_teacher.bias.detach().numpy(),
    }
    banks = {"student": term.student_bank.numpy(), "teacher": term.teacher_bank.numpy()}
    z = {"student": term.z_student.item(), "teacher": term.z_teacher.item()}
    return ref.crd(s, t, heads, banks, contrast(), z, term.nce_t, term.beta)


def run(term: CRD, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(2)
    return term(student, teacher, index=INDEX)


def test_value_and_gradient_match_the_reference() -> None:
    term = sized_crd()
    student, teacher = features()
    student.requires_grad_()
    value = run(term, student, teacher)
    value.backward()
    s, t = student.detach().numpy(), teacher.numpy()
    assert value.item() == pytest.approx(reference(term, s, t), rel=1e-9)
    expected = ref.numeric_gradient(lambda x: reference(term, x, t), s)
    np.testing.assert_allclose(student.grad.numpy(), expected, rtol=1e-4, atol=1e-7)


def test_gradcheck_in_float64() -> None:
    term = sized_crd()
    student, teacher = features()
    assert torch.autograd.gradcheck(lambda x: run(term, x, teacher), (student.requires_grad_(),))


def test_bf16_autocast_stays_finite() -> None:
    term = sized_crd(torch.float32)
    student, teacher = features(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = run(term, student * 30, teacher * 30)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_positive_aligned_with_the_bank_lowers_the_loss() -> None:
    """The student-side NCE is lower when the teacher bank's positive row is the student's own embedding
    than when it points the opposite way (the student side scores against the teacher bank)."""
    term = sized_crd()
    student, teacher = features()
    e_s = term.embed(term.embed_student, student).detach()
    values = []
    for sign in (1.0, -1.0):
        term.teacher_bank[INDEX] = sign * e_s
        values.append(run(term, student, teacher).item())
    assert values[0] < values[1]


def test_z_is_estimated_once_and_the_bank_moves_only_in_training() -> None:
    term = sized_crd()
    term.z_student.fill_(-1.0)
    student, teacher = features()
    before = term.teacher_bank.clone(), term.student_bank.clone()
    e_s = term.embed(term.embed_student, student)
    e_t = term.embed(term.embed_teacher, teacher)
    idx = torch.as_tensor(contrast())
    expected_z = torch.exp(torch.einsum("bkd,bd->bk", before[0][idx], e_s) / term.nce_t).mean().item() * N
    run(term, student, teacher)  # eval mode: Z estimated, banks untouched
    assert term.z_student.item() == pytest.approx(expected_z, rel=1e-12) and term.z_teacher.item() == 13.0
    assert torch.equal(term.teacher_bank, before[0]) and torch.equal(term.student_bank, before[1])
    run(term.train(), student, teacher)
    assert term.z_student.item() == pytest.approx(expected_z, rel=1e-12)  # estimated once only
    for bank, old, e in ((term.student_bank, before[1], e_s), (term.teacher_bank, before[0], e_t)):
        moved = torch.nn.functional.normalize(0.5 * old[INDEX] + 0.5 * e.detach(), dim=1)
        torch.testing.assert_close(bank[INDEX], moved)
        others = torch.ones(N, dtype=torch.bool)
        others[INDEX] = False
        assert torch.equal(bank[others], old[others])
        torch.testing.assert_close(bank[INDEX].norm(dim=1), torch.ones(B, dtype=bank.dtype))


def test_missing_sample_count_or_index_out_of_range_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^k\.num_samples is unknown"):
        CRD().setup_data(None, "k")
    term = sized_crd()
    student, teacher = features()
    with pytest.raises(ConfigError, match=r"outside its memory bank of 11 rows"):
        term(student, teacher, index=torch.tensor([0, 1, 2, 11]))


def crd_module() -> DistillationModule:
    terms = {"kd": KLDivergence(), "crd": CRD(student_layer="blocks.1", teacher_layer="blocks.0", nce_k=K)}
    module = DistillationModule(
        student=Net(), teacher=Net(width=8), loss=DistillationLoss(terms, alpha=0.5),
        optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=3,
    )  # fmt: skip
    module.setup_for(X, num_samples=N)
    return module


def test_module_routes_index_only_to_crd_and_checkpoints_the_bank() -> None:
    module = crd_module()
    y = torch.tensor([0, 1, 2, 0, 1])
    bank = module.loss.terms["crd"].student_bank
    before = bank.clone()
    module.training_step((X, y, torch.tensor([0, 1, 2, 3, 4])), 0).backward()  # KLDivergence gets no index
    assert not torch.equal(bank[:5], before[:5]) and torch.equal(bank[5:], before[5:])
    assert all(p.grad is not None for p in module.student.parameters())
    in_optimizer = {id(p) for group in module.configure_optimizers().param_groups for p in group["params"]}
    assert {id(p) for p in module.loss.terms["crd"].parameters()} <= in_optimizer
    assert id(bank) not in in_optimizer
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    saved = checkpoint["state_dict"]
    assert {f"loss.terms.crd.{name}" for name in ("student_bank", "teacher_bank", "z_student", "z_teacher")} <= set(
        saved
    )
    resumed = crd_module()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(resumed.loss.terms["crd"].student_bank, bank)


def test_batches_without_index_fail_naming_data_return_index() -> None:
    with pytest.raises(ConfigError, match=r"data\.return_index=true"):
        crd_module().training_step((X, torch.tensor([0, 1, 2, 0, 1])), 0)


def test_mnist1d_return_index_yields_positions_and_sizes_the_bank(kd_home: Path) -> None:
    data = MNIST1DDataModule(
        str(kd_home / "data"), batch_size=7, val_samples=50, transfer_samples=30, return_index=True
    )
    assert data.num_train_samples == 4030
    x, _, index = next(iter(data.val_dataloader()))
    assert x.shape == (7, 1, 40) and torch.equal(index, torch.arange(7))
    x_train, y_train, index = next(iter(data.train_dataloader()))
    train = data.splits["train"].tensors
    assert torch.equal(train[0][index], x_train) and torch.equal(train[1][index], y_train)
    plain = MNIST1DDataModule(str(kd_home / "data"), val_samples=50)
    plain.setup()
    assert len(next(iter(plain.val_dataloader()))) == 2
