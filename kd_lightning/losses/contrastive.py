"""Contrastive representation distillation (CRD) with a per-sample memory bank."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_positive
from kd_lightning.losses.precision import at_least_fp32, autocast_off
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm


def nce_loss(scores: Tensor, num_samples: int, eps: float = 1e-7) -> Tensor:
    r"""The NCE loss of CRD's ``ContrastLoss`` on unnormalised probabilities ``scores`` ``(B, 1 + K)``
    (column 0 the positive pair, the rest K noise samples drawn with probability :math:`P_n = 1/N`):

    .. math::
        L = -\frac{1}{B} \sum_b \Big( \log \frac{P_{b,0}}{P_{b,0} + K P_n}
            + \sum_{k=1}^{K} \log \frac{K P_n}{P_{b,k} + K P_n} \Big)
    """
    k = scores.shape[1] - 1
    noise = k / num_samples
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + eps))
    negative = torch.log(noise / (scores[:, 1:] + noise + eps))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


class CRD(LayerTerm):
    r"""Contrastive Representation Distillation (Tian et al., "Contrastive Representation
    Distillation", ICLR 2020), the paper's NCE objective as in the authors' code (RepDistiller).

    Student and teacher features (flattened) are embedded by linear heads to ``feat_dim`` and
    L2-normalised: :math:`e_s = g_s(F_s) / \|g_s(F_s)\|`, :math:`e_t` likewise. Two memory banks hold
    one embedding per training sample, :math:`M_s` (student) and :math:`M_t` (teacher). For each sample
    :math:`i` of the batch, with ``nce_k`` indices :math:`j_1 \dots j_K` drawn uniformly from the
    :math:`N` training samples and :math:`j_0 = i`,

    .. math::
        P^t_{i,k} = \frac{\exp(M_s[j_k] \cdot e_t^i / \tau)}{Z_t}, \qquad
        P^s_{i,k} = \frac{\exp(M_t[j_k] \cdot e_s^i / \tau)}{Z_s}, \qquad
        L_{crd} = \beta \big( \mathrm{NCE}(P^s) + \mathrm{NCE}(P^t) \big)

    (:func:`nce_loss`, noise probability :math:`1/N`). :math:`Z_s, Z_t` are estimated once, on the
    first training batch, as :math:`N` times the mean of the exponentiated scores, and kept fixed (a
    Monte-Carlo estimate of the partition function, as in the authors' code). After each training
    step the banks move towards the batch's embeddings:
    :math:`M[i] \leftarrow \mathrm{normalize}(m\,M[i] + (1 - m)\,e^i)`; no gradient flows into them.

    Published (CIFAR-100): ``feat_dim = 128``, ``nce_k = 16384``, ``nce_t = 0.07``, ``momentum = 0.5``
    and ``beta = 0.8`` beside CE weight 1 (this library's ``alpha = 0.5`` with ``beta = 0.8`` keeps that
    ratio). Defaults here: the published values except ``nce_k = 4096``, which fits MNIST-1D's 24,000
    training samples (official 4,000 + 20,000 transfer). Negatives are drawn uniformly over all
    samples (as in the paper and the authors' ``ContrastMemory`` when no indices are supplied; their
    CIFAR script instead draws negatives from other classes, which needs labels).

    Needs each batch's dataset sample indices (``uses_index``: ``data.return_index=true``, which
    ``kd-distill`` sets by itself) and the training-set size ``num_samples`` (``None``: taken from the
    datamodule at setup). The banks are buffers: saved in checkpoints, never optimised, updated only
    in training mode. The authors' code does not synchronise the banks across DDP ranks; neither does this.
    A configured ``num_samples`` smaller than the datamodule's training set is refused at setup; the indices
    of the first batch are checked against it (later batches are not: reading them on the host every step
    would stall an accelerator).
    """

    has_adapters = True
    uses_index = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        beta: float = 0.8,
        feat_dim: int = 128,
        nce_k: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        num_samples: int | None = None,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        for name, value in (("feat_dim", feat_dim), ("nce_k", nce_k)):
            if value < 1:
                raise ConfigError(f"loss.terms.crd.{name}={value} must be >= 1")
        check_positive(nce_t, "loss.terms.crd.nce_t", " (published: 0.07)")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"loss.terms.crd.momentum={momentum} must be in [0, 1) (published: 0.5)")
        self.feat_dim = int(feat_dim)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.momentum = float(momentum)
        self.num_samples = num_samples
        self.index_checked = False
        self.embed_student: nn.Module | None = None
        self.embed_teacher: nn.Module | None = None
        # Buffers (saved, never optimised), sized by setup_shapes; None ones are not in the state_dict.
        self.student_bank: Tensor | None
        self.teacher_bank: Tensor | None
        self.z_student: Tensor | None
        self.z_teacher: Tensor | None
        for name in ("student_bank", "teacher_bank", "z_student", "z_teacher"):
            self.register_buffer(name, None)

    def setup_data(self, num_samples: int | None, key: str) -> None:
        if self.num_samples is None:
            self.num_samples = num_samples
        elif num_samples is not None and self.num_samples < num_samples:
            raise ConfigError(
                f"{key}.num_samples={self.num_samples} is smaller than the training set ({num_samples} samples): "
                f"CRD keeps one memory entry per sample; set {key}.num_samples=null (the training-set size)"
            )
        if self.num_samples is None or self.num_samples < 1:
            raise ConfigError(
                f"{key}.num_samples is unknown ({self.num_samples}): CRD keeps one memory entry per training "
                "sample; use a datamodule with num_train_samples or set it to the training-set size"
            )

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if self.num_samples is None:
            raise ConfigError(f"{key}.num_samples is unknown: call setup_data(num_samples) before setup_shapes")
        device = student.device
        self.embed_student = nn.Linear(student[0].numel(), self.feat_dim).to(device)
        self.embed_teacher = nn.Linear(teacher[0].numel(), self.feat_dim).to(device)
        # The authors' initialisation: uniform in +-1/sqrt(feat_dim / 3) (unit-variance rows on average).
        bound = 1.0 / math.sqrt(self.feat_dim / 3)
        for name in ("student_bank", "teacher_bank"):
            bank = torch.rand(self.num_samples, self.feat_dim, device=device) * 2 * bound - bound
            self.register_buffer(name, bank)
        self.register_buffer("z_student", torch.tensor(-1.0, device=device))  # < 0: not estimated yet
        self.register_buffer("z_teacher", torch.tensor(-1.0, device=device))

    def embed(self, head: nn.Module, features: Tensor) -> Tensor:
        return F.normalize(at_least_fp32(head(features.flatten(1))), dim=1)

    def scores(self, bank: Tensor, embedding: Tensor, contrast: Tensor, z: Tensor) -> Tensor:
        """``exp(bank[contrast] . embedding / nce_t) / Z``, ``(B, 1 + K)``; estimates ``Z`` on first use."""
        weights = bank[contrast].to(embedding.dtype)  # (B, 1 + K, D), no gradient into the bank
        out = torch.exp(torch.bmm(weights, embedding.unsqueeze(2)).squeeze(2) / self.nce_t)
        # Z < 0: not estimated yet; estimated on the device (no host read), then kept.
        estimated = torch.where(z < 0, out.detach().mean().to(z.dtype) * self.num_samples, z)
        z.copy_(estimated)
        return out / estimated.to(out.dtype)

    @torch.no_grad()
    def update(self, bank: Tensor, index: Tensor, embedding: Tensor) -> None:
        """Momentum update of the bank rows ``index`` towards ``embedding``, renormalised."""
        rows = bank[index] * self.momentum + embedding.detach().to(bank.dtype) * (1 - self.momentum)
        bank.index_copy_(0, index, F.normalize(rows, dim=1))

    def forward(
        self, student: Tensor, teacher: Tensor, targets: Tensor | None = None, *, index: Tensor | None = None
    ) -> Tensor:
        if self.embed_student is None or self.embed_teacher is None or self.student_bank is None:
            raise RuntimeError(
                "CRD got features before its embeddings and memory bank were sized; "
                "DistillationModule.setup_for(example_input, num_samples) sizes them before training"
            )
        if index is None:
            raise ConfigError("loss.terms.crd needs the batch's dataset sample indices: set data.return_index=true")
        index = index.to(self.student_bank.device).long()
        if not self.index_checked:  # the first batch only (setup_data checked the sizes): a host read
            if int(index.min()) < 0 or int(index.max()) >= self.num_samples:
                raise ConfigError(
                    f"loss.terms.crd got sample index {int(index.max())} outside its memory bank of "
                    f"{self.num_samples} rows; set loss.terms.crd.num_samples to the training-set size"
                )
            self.index_checked = True
        e_s = self.embed(self.embed_student, student)
        e_t = self.embed(self.embed_teacher, teacher)
        negatives = torch.randint(self.num_samples, (index.shape[0], self.nce_k), device=index.device)
        contrast = torch.cat([index.unsqueeze(1), negatives], dim=1)
        with autocast_off(e_s):
            p_teacher = self.scores(self.student_bank, e_t, contrast, self.z_teacher)
            p_student = self.scores(self.teacher_bank, e_s, contrast, self.z_student)
            loss = nce_loss(p_student, self.num_samples) + nce_loss(p_teacher, self.num_samples)
        if self.training:
            self.update(self.student_bank, index, e_s)
            self.update(self.teacher_bank, index, e_t)
        return self.beta * loss
