"""CTKD (global temperature) against a transcription of its authors' code, its curriculum, and its learnable
temperature training with the student and living in the student's checkpoint.

The ``authors_*`` code below transcribes (not imports) github.com/zhengli97/CTKD at commit
7d5252241259ae70d38a832371fed9697d15fc14: ``models/temp_global.py`` (``Global_T`` and
``GradientReversalFunction``: identity forward, gradient times ``lambda_``), ``distiller_zoo/KD.py``
(``DistillKL``: ``KLDivLoss(batchmean)(log_softmax(y_s/T), softmax(y_t/T)) * T * T``), ``helper/loops.py``
(``temp = t_start + t_end * sigmoid(mlp_net(logit_t, logit_s, cos_value))``) and ``helper/util.py``
(``CosineDecay.get_value``, called with the 1-based epoch, ``max_value=0, min_value=-1, num_loops=10`` in
``scripts/run_cifar_distill.sh``). Its ``cos_value`` is our ``-reversal``.

Tolerance: relative error <= 1e-10 (plus 1e-12 absolute) on the value and on the gradients of the student's
logits and of the temperature parameter, float64.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import CTKD, TERMS, DistillationLoss
from kd_lightning.methods.kd import DistillationModule
from tests.test_taps import Net, X

RTOL, ATOL = 1e-10, 1e-12


class AuthorsReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambda_):
        ctx.lambda_ = lambda_
        return x.clone()

    @staticmethod
    def backward(ctx, grads):
        lambda_ = grads.new_tensor(ctx.lambda_)
        return lambda_ * grads, None


def authors_cosine_decay(i: int, max_value: float = 0.0, min_value: float = -1.0, num_loops: int = 10) -> float:
    i = max(i, 0)
    i = min(i, num_loops)
    value = (math.cos(i * math.pi / num_loops) + 1.0) * 0.5
    return value * (max_value - min_value) + min_value


def authors_ctkd(logit_s, logit_t, global_t, cos_value, t_start=1.0, t_end=20.0):
    temp = t_start + t_end * torch.sigmoid(AuthorsReversal.apply(global_t, cos_value))
    return torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(logit_s / temp, dim=1), F.softmax(logit_t / temp, dim=1)
    ) * (temp * temp)


def logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(6, 9, generator=generator, dtype=torch.float64) * 4
    return student, teacher


@pytest.mark.parametrize("epoch", [0, 3, 9, 30])
@pytest.mark.parametrize("init", [1.0, -0.7])
def test_value_and_gradients_match_the_authors_code(epoch: int, init: float) -> None:
    student, teacher = logits(epoch)
    term = CTKD(init=init).double()
    with torch.no_grad():
        term.raw_temperature.fill_(init)  # exactly init, not its float32 rounding
    term.start_epoch(epoch)
    s = student.clone().requires_grad_()
    value = term(s, teacher)
    value.backward()

    s_ref = student.clone().requires_grad_()
    global_t = torch.full((1,), init, dtype=torch.float64, requires_grad=True)
    reference = authors_ctkd(s_ref, teacher, global_t, authors_cosine_decay(epoch + 1))
    reference.backward()

    assert value.shape == ()
    torch.testing.assert_close(value, reference.reshape(()), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(s.grad, s_ref.grad, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(term.raw_temperature.grad.reshape(1), global_t.grad, rtol=RTOL, atol=ATOL)


def test_curriculum_is_the_authors_cosine_decay_negated() -> None:
    term = CTKD()
    for epoch in range(15):
        term.start_epoch(epoch)
        assert term.reversal == pytest.approx(-authors_cosine_decay(epoch + 1), abs=1e-15)
    term.start_epoch(0)
    assert 0.0 < term.reversal < 0.03  # epoch 1 already reverses a little
    assert CTKD().current_temperature() == pytest.approx(1 + 20 / (1 + math.exp(-1.0)))


def test_reversed_gradient_raises_the_temperature_when_that_raises_the_loss() -> None:
    """The temperature ascends the KD loss: one SGD step on theta (lambda = 1) increases the loss."""
    student, teacher = logits(1)
    term = CTKD().double()
    term.start_epoch(20)
    before = term(student, teacher)
    before.backward()
    with torch.no_grad():
        term.raw_temperature -= 0.1 * term.raw_temperature.grad
    assert term(student, teacher).item() > before.item()


def ctkd_module() -> DistillationModule:
    loss = DistillationLoss({"ctkd": CTKD()}, alpha=0.9)
    return DistillationModule(
        student=Net(), teacher=Net(width=8), loss=loss, optimizer=partial(torch.optim.SGD, lr=0.1), num_classes=3
    )


def test_temperature_trains_with_the_student_and_is_in_its_checkpoint() -> None:
    torch.manual_seed(0)
    module = ctkd_module()
    module.setup_for(X)
    term = module.loss.terms["ctkd"]
    module.loss.start_epoch(20)  # lambda = 1
    optimizer = module.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(term.raw_temperature) in in_optimizer
    with torch.no_grad():
        term.raw_temperature.fill_(-2.0)  # tau ~ 3.4: the small Net's logits then move the loss visibly
    before = term.raw_temperature.detach().clone()
    module.training_step((X * 10, torch.tensor([0, 1, 2, 0, 1])), 0).backward()
    grad = term.raw_temperature.grad.detach().clone()
    assert grad.abs().item() > 1e-6
    optimizer.step()
    torch.testing.assert_close(term.raw_temperature.detach(), before - 0.1 * grad)
    assert not torch.equal(term.raw_temperature.detach(), before)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert "loss.terms.ctkd.raw_temperature" in checkpoint["state_dict"]
    resumed = ctkd_module()
    resumed.on_load_checkpoint(checkpoint)
    resumed.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(resumed.loss.terms["ctkd"].raw_temperature, term.raw_temperature)


def test_loss_start_epoch_reaches_the_term() -> None:
    loss = DistillationLoss({"ctkd": CTKD(curriculum_epochs=4)})
    loss.start_epoch(3)
    assert loss.terms["ctkd"].reversal == pytest.approx(1.0)


def test_bad_settings_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ctkd\.t_start=0"):
        CTKD(t_start=0)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ctkd\.curriculum_epochs=0"):
        CTKD(curriculum_epochs=0)
    assert TERMS["ctkd"] is CTKD
