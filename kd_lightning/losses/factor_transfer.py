"""FT: factor transfer through a paraphraser trained on the teacher and a translator trained with the student."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.features import unsized
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm

#: Per spatial rank (1-D / 2-D maps): convolution, transposed convolution, adaptive average pooling.
_MAPS: dict[int, tuple[type[nn.Module], type[nn.Module], Callable[..., Tensor]]] = {
    3: (nn.Conv1d, nn.ConvTranspose1d, F.adaptive_avg_pool1d),
    4: (nn.Conv2d, nn.ConvTranspose2d, F.adaptive_avg_pool2d),
}


def _stack(layer: type[nn.Module], widths: list[int]) -> nn.Sequential:
    """``layer(widths[i], widths[i + 1], 3, padding 1) -> LeakyReLU(0.1)`` for every consecutive pair."""
    blocks: list[nn.Module] = []
    for width_in, width_out in pairwise(widths):
        blocks += [layer(width_in, width_out, 3, 1, 1), nn.LeakyReLU(0.1)]
    return nn.Sequential(*blocks)


class Paraphraser(nn.Module):
    """The authors' paraphraser (``Models/FeatureProjection.py``): an encoder of three 3-wide convs
    ``C -> C -> m -> m`` and a decoder of three transposed convs ``m -> m -> C -> C``, each followed by
    LeakyReLU(0.1), no BatchNorm; ``m`` factor channels. ``encoder(x)`` is the teacher factor."""

    def __init__(self, rank: int, channels: int, factors: int) -> None:
        super().__init__()
        conv, transposed, _ = _MAPS[rank]
        self.encoder = _stack(conv, [channels, channels, factors, factors])
        self.decoder = _stack(transposed, [factors, factors, channels, channels])

    def forward(self, x: Tensor) -> Tensor:
        """The reconstruction ``decoder(encoder(x))``."""
        return self.decoder(self.encoder(x))


def factor_transfer_loss(student_factor: Tensor, teacher_factor: Tensor) -> Tensor:
    r"""The mean absolute difference of the per-sample L2-normalised factors (the authors' ``nn.L1Loss()`` of
    ``utils.FT``): :math:`\frac{1}{B D}\sum_b \| F_S^b/\|F_S^b\|_2 - F_T^b/\|F_T^b\|_2 \|_1`, ``D`` the factor's
    size per sample. The larger spatial map is first average-pooled to the smaller's size (as RepDistiller)."""
    student_factor, teacher_factor = at_least_fp32(student_factor), at_least_fp32(teacher_factor)
    if student_factor.shape[2:] != teacher_factor.shape[2:]:
        pool = _MAPS[student_factor.dim()][2]
        size = tuple(min(s, t) for s, t in zip(student_factor.shape[2:], teacher_factor.shape[2:], strict=True))
        student_factor, teacher_factor = pool(student_factor, size), pool(teacher_factor, size)
    student_factor = F.normalize(student_factor.flatten(1), dim=1)
    teacher_factor = F.normalize(teacher_factor.flatten(1), dim=1)
    return (student_factor - teacher_factor).abs().mean()


class FactorTransfer(LayerTerm):
    r"""Factor transfer (Kim, Park & Kwak, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018; code: Jangho-Kim/Factor-Transfer-pytorch).

    Stage 1 trains a paraphraser :math:`P = D \circ E` (:class:`Paraphraser`, ``round(k C_t)`` factor channels,
    paraphrase rate ``k``) to reconstruct the teacher's last feature map :math:`x_t` (``teacher_layer``) with the
    teacher frozen: :math:`L_{rec} = \mathrm{MSE}(P(x_t), x_t)`. Stage 2 trains the student and a translator
    :math:`T` (three 3-wide convs ``C_s -> C_s -> m -> m`` with LeakyReLU(0.1), in the student's optimizer and
    checkpoint) on its map :math:`x_s` (``student_layer``), against the frozen teacher factor
    :math:`F_T = E(x_t)`, :math:`F_S = T(x_s)`:

    .. math::
        L_{ft} = \beta\,\frac{1}{B\,D}\sum_b \Big\| \frac{F_S^b}{\|F_S^b\|_2} - \frac{F_T^b}{\|F_T^b\|_2} \Big\|_1

    (:func:`factor_transfer_loss`): the paper's :math:`p = 1` norm of the normalised factors, averaged over
    the batch and the factor's :math:`D` elements as in the authors' ``nn.L1Loss()``, the scale the published
    ``beta = 500`` goes with (CIFAR, beside CE weight 1: ``alpha = 0.5`` keeps that ratio).
    RepDistiller's ``distiller_zoo/FT.py`` instead compares :math:`\mathrm{mean}_c F^2` (the channel mean of
    the squared factor, an attention map) and uses ``beta = 200``; its reconstruction loss (MSE, no BatchNorm,
    SGD momentum 0.9, weight decay 5e-4, 30 epochs, lr 0.01 for ResNet / WRN students) is the one used here (the
    authors' code reconstructs with L1).

    Stage 1 is this term's own step before the student's first epoch (:meth:`pretrain`, called by
    ``method=kd`` at the start of training with the frozen teachers' outputs over the training data): the
    student is not run, so its weights are untouched; ``paraphraser_epochs`` counts passes of stage 1 only,
    independent of ``trainer.max_epochs``, and nothing needs keeping in sync. Chosen over a stage of
    :mod:`kd_lightning.methods.stages` (a whole run for an autoencoder, and a checkpoint to hand over) and
    over a callback (a second config to pair with the loss). The paraphraser's parameters never require
    grad outside stage 1 (so they never reach the student's optimizer), it stays in eval mode, and it is
    saved in the checkpoint with a flag that it was trained, so a resumed run does not train it again. A stage-1
    pass is one training epoch's batches (``limit_train_batches`` applies); under data parallelism every
    process trains on its shard and then takes rank 0's paraphraser. Maps of different spatial sizes: the
    larger factor is average-pooled to the smaller (as RepDistiller); 1-D and 2-D maps.
    """

    has_adapters = True
    pretrains = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 500.0,
        rate: float = 0.5,
        paraphraser_epochs: int = 30,
        paraphraser_lr: float = 0.01,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"loss.terms.ft.rate={rate} must be in (0, 1] (the paper's paraphrase rate k: 0.5)")
        if int(paraphraser_epochs) < 1 or not paraphraser_lr > 0:
            raise ConfigError(
                f"loss.terms.ft needs paraphraser_epochs >= 1 and paraphraser_lr > 0 "
                f"(got {paraphraser_epochs}, {paraphraser_lr}); published: 30 and 0.01"
            )
        self.rate = float(rate)
        self.paraphraser_epochs = int(paraphraser_epochs)
        self.paraphraser_lr = float(paraphraser_lr)
        self.paraphraser: Paraphraser | None = None
        self.translator: nn.Sequential | None = None
        self.register_buffer("paraphraser_trained", torch.tensor(False))
        #: Mean reconstruction loss of every stage-1 epoch (of this process's last :meth:`pretrain`).
        self.reconstruction_losses: list[float] = []

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        if self.teacher_read.model == self.student_read.model:  # type: ignore[union-attr]
            raise ConfigError(
                f"{key}.teacher reads model {self.teacher_read.model!r}, the model it distils into; FT's paraphraser "  # type: ignore[union-attr]
                "trains on a frozen teacher's map: name a teacher (e.g. teacher: {model: teacher})"
            )

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if student.dim() not in _MAPS or teacher.dim() != student.dim():
            raise ConfigError(
                f"{key}: factor transfer needs conv maps (B, C, L) or (B, C, H, W) of one rank, got student "
                f"{list(student.shape)} and teacher {list(teacher.shape)}; pick the last conv maps of both models"
            )
        factors = max(1, round(teacher.shape[1] * self.rate))
        self.paraphraser = Paraphraser(teacher.dim(), teacher.shape[1], factors).to(teacher.device)
        self.paraphraser.requires_grad_(False).eval()
        conv = _MAPS[student.dim()][0]
        self.translator = _stack(conv, [student.shape[1], student.shape[1], factors, factors]).to(student.device)

    def train(self, mode: bool = True) -> FactorTransfer:
        """Train mode for the translator; the paraphraser stays in eval mode outside :meth:`pretrain`."""
        super().train(mode)
        if self.paraphraser is not None:
            self.paraphraser.eval()
        return self

    def pretrain(self, teacher_passes: Callable[[], Iterable[Tensor]], key: str) -> None:
        """Stage 1: ``paraphraser_epochs`` passes of SGD (momentum 0.9, weight decay 5e-4) on the reconstruction
        MSE of the teacher maps ``teacher_passes()`` yields; skipped once done (e.g. on resume)."""
        if self.paraphraser is None:
            raise RuntimeError(f"{key}: the paraphraser is sized by setup_shapes before stage 1")
        if bool(self.paraphraser_trained):
            return
        paraphraser = self.paraphraser.requires_grad_(True).train()
        optimizer = torch.optim.SGD(paraphraser.parameters(), lr=self.paraphraser_lr, momentum=0.9, weight_decay=5e-4)
        self.reconstruction_losses = []
        with torch.enable_grad():
            for _ in range(self.paraphraser_epochs):
                total, count = 0.0, 0
                for features in teacher_passes():
                    features = features.detach().to(next(paraphraser.parameters()).dtype)
                    loss = F.mse_loss(paraphraser(features), features)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total, count = total + float(loss.detach()) * len(features), count + len(features)
                self.reconstruction_losses.append(total / max(count, 1))
        paraphraser.requires_grad_(False).eval()
        self.paraphraser_trained.fill_(True)

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if self.paraphraser is None or self.translator is None:
            raise unsized(self, student, teacher)
        with torch.no_grad():
            teacher_factor = self.paraphraser.encoder(teacher.to(next(self.paraphraser.parameters()).dtype))
        return self.beta * factor_transfer_loss(self.translator(student), teacher_factor)
