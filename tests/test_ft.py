"""FT (factor transfer) against a transcription of the authors' code, its two stages in DistillationModule
(paraphraser trained first on the frozen teacher and frozen after, translator trained with the student and
checkpointed, the student untouched by stage 1, the teacher never given gradients) and a ``kd-distill`` process.

References (transcribed here, not imported):

- Jangho-Kim/Factor-Transfer-pytorch, ``Models/FeatureProjection.py`` (``Paraphraser`` mode 1 = encoder,
  ``Translator``), ``utils.py`` (``FT``) and ``train_student.py`` (``BETA * nn.L1Loss()(FT(factor_s),
  FT(factor_t.detach()))``);
- HobbitLong/RepDistiller, ``distiller_zoo/FT.py`` (``FactorTransfer``: an attention-style factor, documented
  relation below).
"""

from __future__ import annotations

import copy
import json
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from kd_lightning.callbacks import FrozenTeacherGuard
from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses import TERMS, DistillationLoss, FactorTransfer
from kd_lightning.losses.factor_transfer import factor_transfer_loss
from kd_lightning.methods.kd import DistillationModule
from kd_lightning.models import ConvNet1D
from tests.conftest import TINY, tiny_trainer
from tests.test_cli import run

REL = 1e-5
LAST = "features.5"  # ConvNet1D (depth 3): the last conv block's ReLU output


def randn(*shape: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).requires_grad_()


# ------------------------------------------------------------------ transcription of the authors' code
class AuthorsParaphraser(nn.Module):
    """Jangho-Kim/Factor-Transfer-pytorch Models/FeatureProjection.py ``Paraphraser`` (Conv2d, mode 0 and 1)."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.leakyrelu = nn.LeakyReLU(0.1)
        self.conv0 = nn.Conv2d(in_planes, in_planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.deconv0 = nn.ConvTranspose2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.deconv1 = nn.ConvTranspose2d(planes, in_planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.deconv2 = nn.ConvTranspose2d(in_planes, in_planes, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: Tensor, mode: int) -> Tensor:
        out = self.leakyrelu(self.conv0(x))
        out = self.leakyrelu(self.conv1(out))
        out = self.leakyrelu(self.conv2(out))
        if mode == 0:
            out = self.leakyrelu(self.deconv0(out))
            out = self.leakyrelu(self.deconv1(out))
            out = self.leakyrelu(self.deconv2(out))
        return out


class AuthorsTranslator(nn.Module):
    """Jangho-Kim/Factor-Transfer-pytorch Models/FeatureProjection.py ``Translator``."""

    def __init__(self, in_planes: int, planes: int) -> None:
        super().__init__()
        self.leakyrelu = nn.LeakyReLU(0.1)
        self.conv0 = nn.Conv2d(in_planes, in_planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=1, padding=1, bias=True)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.leakyrelu(self.conv0(x))
        out = self.leakyrelu(self.conv1(out))
        return self.leakyrelu(self.conv2(out))


def authors_ft(x: Tensor) -> Tensor:
    """Jangho-Kim/Factor-Transfer-pytorch utils.py ``FT``."""
    return F.normalize(x.view(x.size(0), -1))


def authors_loss(translator: nn.Module, paraphraser: nn.Module, f_s: Tensor, f_t: Tensor, beta: float) -> Tensor:
    """Jangho-Kim/Factor-Transfer-pytorch train_student.py, the FT part of the student's loss."""
    factor_t = paraphraser(f_t, 1)
    factor_s = translator(f_s)
    return beta * nn.L1Loss()(authors_ft(factor_s), authors_ft(factor_t.detach()))


def repdistiller_loss(f_s: Tensor, f_t: Tensor, p1: int = 2, p2: int = 1) -> Tensor:
    """HobbitLong/RepDistiller distiller_zoo/FT.py ``FactorTransfer.factor_loss`` (equal spatial sizes)."""

    def factor(f: Tensor) -> Tensor:
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))

    if p2 == 1:
        return (factor(f_s) - factor(f_t)).abs().mean()
    return (factor(f_s) - factor(f_t)).pow(p2).mean()


def copy_into_authors(term: FactorTransfer) -> tuple[AuthorsTranslator, AuthorsParaphraser]:
    """The authors' modules holding our term's weights (our Sequentials: conv at 0, 2, 4; LeakyReLU between)."""
    s_in, factors = term.translator[0].in_channels, term.translator[4].out_channels
    t_in = term.paraphraser.encoder[0].in_channels
    translator, paraphraser = AuthorsTranslator(s_in, factors), AuthorsParaphraser(t_in, factors)
    for i, name in enumerate(("conv0", "conv1", "conv2")):
        getattr(translator, name).load_state_dict(term.translator[2 * i].state_dict())
        getattr(paraphraser, name).load_state_dict(term.paraphraser.encoder[2 * i].state_dict())
    for i, name in enumerate(("deconv0", "deconv1", "deconv2")):
        getattr(paraphraser, name).load_state_dict(term.paraphraser.decoder[2 * i].state_dict())
    return translator.double(), paraphraser.double()


def sized_term(student: Tensor, teacher: Tensor, **kwargs: float) -> FactorTransfer:
    torch.manual_seed(0)
    term = FactorTransfer("s", "t", **kwargs)
    term.setup_shapes(student, teacher, "loss.terms.ft")
    return term.double()


def test_ft_matches_the_authors_code_value_and_gradients() -> None:
    f_s, f_t = randn(4, 3, 5, 5, seed=1), randn(4, 6, 5, 5, seed=2)
    term = sized_term(f_s, f_t)
    translator, paraphraser = copy_into_authors(term)
    ours, theirs = term(f_s, f_t), authors_loss(translator, paraphraser, f_s, f_t, 500.0)
    assert ours.dtype == theirs.dtype == torch.float64
    assert ours.item() == pytest.approx(theirs.item(), rel=REL)
    mine = torch.autograd.grad(ours, [f_s, *term.translator.parameters()])
    other = torch.autograd.grad(theirs, [f_s, *translator.parameters()])
    for a, b in zip(mine, other, strict=True):
        torch.testing.assert_close(a, b, rtol=REL, atol=REL * b.abs().max().item())
    # The teacher factor is detached, as in the authors' code: neither the teacher map nor the paraphraser gets one.
    assert torch.autograd.grad(term(f_s, f_t), f_t, allow_unused=True)[0] is None


def test_ft_reconstruction_is_the_authors_mode_zero() -> None:
    f_t = randn(2, 6, 4, 4, seed=3)
    term = sized_term(randn(2, 3, 4, 4, seed=4), f_t)
    _, paraphraser = copy_into_authors(term)
    torch.testing.assert_close(term.paraphraser(f_t), paraphraser(f_t, 0), rtol=REL, atol=1e-12)


def test_repdistiller_loss_is_ours_on_the_channel_mean_of_squares() -> None:
    """RepDistiller compares the channel mean of the squared factors (an attention map) with p = 1 and no beta;
    ours, on those maps as one-channel factors, is the same number: the documented difference is only the factor."""
    f_s, f_t = randn(3, 4, 5, 5, seed=5), randn(3, 2, 5, 5, seed=6)
    attention = [f.pow(2).mean(1, keepdim=True) for f in (f_s, f_t)]
    ours, theirs = factor_transfer_loss(*attention), repdistiller_loss(f_s, f_t)
    assert ours.item() == pytest.approx(theirs.item(), rel=REL)


def test_zero_at_equal_normalised_factors_and_finite() -> None:
    factor = randn(4, 3, 6, seed=7)
    assert factor_transfer_loss(factor, 2.5 * factor).item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(factor_transfer_loss(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)))
    # Different spatial sizes: the larger is average-pooled to the smaller's (as RepDistiller).
    small, large = randn(2, 3, 4, seed=8), randn(2, 3, 8, seed=9)
    pooled = F.adaptive_avg_pool1d(large, 4)
    torch.testing.assert_close(factor_transfer_loss(small, large), factor_transfer_loss(small, pooled))


def test_bad_settings_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ft\.rate=0"):
        FactorTransfer(rate=0.0)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ft needs paraphraser_epochs >= 1"):
        FactorTransfer(paraphraser_epochs=0)
    with pytest.raises(ConfigError, match=r"^loss\.terms\.ft: factor transfer needs conv maps"):
        FactorTransfer().setup_shapes(torch.randn(2, 5), torch.randn(2, 5), "loss.terms.ft")


# ------------------------------------------------------------------------------ the two stages in the module
def module_and_loader(epochs: int = 3) -> tuple[DistillationModule, DataLoader]:
    torch.manual_seed(0)
    term = FactorTransfer(LAST, LAST, paraphraser_epochs=epochs, paraphraser_lr=0.05)
    module = DistillationModule(
        student=ConvNet1D(num_classes=3, channels=4, length=16),
        teacher=ConvNet1D(num_classes=3, channels=8, length=16),
        loss=DistillationLoss({"ft": term}, alpha=0.5),
        optimizer=partial(torch.optim.SGD, lr=0.05),
        num_classes=3,
    )
    x = torch.randn(48, 1, 16, generator=torch.Generator().manual_seed(1))
    module.setup_for(x[:8])
    return module, DataLoader(TensorDataset(x, (x.mean((1, 2)) > 0).long()), batch_size=16)


def test_stage_one_trains_the_paraphraser_alone_then_freezes_it() -> None:
    module, loader = module_and_loader(epochs=4)
    term = module.loss.terms["ft"]
    student, translator = copy.deepcopy(module.student.state_dict()), copy.deepcopy(term.translator.state_dict())
    before = [p.clone() for p in term.paraphraser.parameters()]
    module.loss.pretrain(lambda: (module.distilled_outputs(x, "train", None) for x, _ in loader))
    losses = term.reconstruction_losses
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, term.paraphraser.parameters(), strict=True))
    for state, now in ((student, module.student.state_dict()), (translator, term.translator.state_dict())):
        assert all(torch.equal(state[k], now[k]) for k in state)
    assert bool(term.paraphraser_trained) and not any(p.requires_grad for p in term.paraphraser.parameters())
    assert all(p.grad is None for p in module.teacher.parameters())
    trained = [p.clone() for p in term.paraphraser.parameters()]
    module.loss.pretrain(lambda: pytest.fail("a trained paraphraser is not trained again"))
    assert all(torch.equal(a, b) for a, b in zip(trained, term.paraphraser.parameters(), strict=True))


def test_two_stages_in_a_fit_translator_trains_paraphraser_and_teacher_frozen(tmp_path: Path) -> None:
    module, loader = module_and_loader(epochs=2)
    term = module.loss.terms["ft"]
    seen: dict[str, object] = {}

    class Record(L.Callback):
        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: DistillationModule) -> None:
            if "paraphraser" not in seen:  # after stage 1, before the student's first step
                seen["paraphraser"] = [p.clone() for p in term.paraphraser.parameters()]
                seen["translator"] = [p.clone() for p in term.translator.parameters()]
                seen["student"] = copy.deepcopy(pl_module.student.state_dict())
                seen["optimized"] = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}

    student = copy.deepcopy(module.student.state_dict())
    teacher = copy.deepcopy(module.teacher.state_dict())
    trainer = tiny_trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        callbacks=[FrozenTeacherGuard(), Record()],
        enable_checkpointing=True,
    )
    trainer.fit(module, loader, loader)
    assert len(term.reconstruction_losses) == 2 and bool(term.paraphraser_trained)
    assert all(torch.equal(student[k], v) for k, v in seen["student"].items())  # stage 1 left the student alone
    paraphraser, translator = list(term.paraphraser.parameters()), list(term.translator.parameters())
    assert not {id(p) for p in paraphraser} & seen["optimized"]
    assert {id(p) for p in translator} <= seen["optimized"]
    assert all(torch.equal(a, b) for a, b in zip(seen["paraphraser"], paraphraser, strict=True))
    assert all(p.grad is None and not p.requires_grad for p in paraphraser)
    assert any(not torch.equal(a, b) for a, b in zip(seen["translator"], translator, strict=True))
    assert all(torch.equal(teacher[k], v) for k, v in module.teacher.state_dict().items())
    assert all(p.grad is None for p in module.teacher.parameters())
    checkpoint = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)["state_dict"]
    assert {"loss.terms.ft.translator.0.weight", "loss.terms.ft.paraphraser.encoder.0.weight"} <= set(checkpoint)
    assert bool(checkpoint["loss.terms.ft.paraphraser_trained"])


def test_a_resumed_fit_keeps_the_trained_paraphraser(tmp_path: Path) -> None:
    options = dict(enable_checkpointing=True)
    module, loader = module_and_loader(epochs=2)
    tiny_trainer(default_root_dir=tmp_path, max_epochs=1, **options).fit(module, loader)
    checkpoint = next((tmp_path / "checkpoints").glob("*.ckpt"))
    trained = [p.clone() for p in module.loss.terms["ft"].paraphraser.parameters()]
    resumed, _ = module_and_loader(epochs=2)
    tiny_trainer(default_root_dir=tmp_path / "resumed", max_epochs=2, **options).fit(
        resumed, loader, ckpt_path=checkpoint
    )
    term = resumed.loss.terms["ft"]
    assert term.reconstruction_losses == [] and bool(term.paraphraser_trained)  # stage 1 not run again
    assert all(torch.equal(a, b) for a, b in zip(trained, term.paraphraser.parameters(), strict=True))


def test_bf16_autocast_in_the_module_stays_finite_and_float32() -> None:
    module, loader = module_and_loader()
    x = next(iter(loader))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = {"student": module.student_outputs(x * 30), "teacher": module.teacher_outputs(x * 30)}
        value = module.loss(outputs, torch.zeros(len(x), dtype=torch.long)).parts["ft"]
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_registered() -> None:
    assert TERMS["ft"] is FactorTransfer


@pytest.mark.slow  # ~20 s: a teacher is trained first
def test_kd_distill_with_loss_ft_runs_as_a_process(kd_home: Path) -> None:
    overrides = [*TINY, "loss=ft", "student=cnn1d_narrow", "loss.terms.ft.paraphraser_epochs=1", "logger=none"]
    result = run("kd-distill", *overrides, "compare_scratch=false", f"hydra.run.dir={kd_home / 'ft'}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((kd_home / "ft" / "summary.json").read_text())["metrics"]
    assert math.isfinite(metrics["train/loss_ft"]) and metrics["train/loss_ft"] > 0
    assert 0.0 <= metrics["test/acc"] <= 1.0
