"""WKD-L: logit distillation by a discrete Wasserstein distance between categorical distributions, with a
category cost from the teacher's classifier (Lv et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_type
from kd_lightning.losses.logit_multilevel import find_head
from kd_lightning.losses.logits import LogitTerm, non_target, resolve_targets
from kd_lightning.losses.reads import ReadSpec


def classifier_cost(weight: Tensor, sharpen: float) -> Tensor:
    """``(K, K)`` category cost ``1 - cos(w_i, w_j)`` of the classifier's rows, sharpened to ``1 - exp(-s d)``
    for ``sharpen`` s != 0 (the authors' ``COST_MATRIX_SHARPEN``)."""
    normed = F.normalize(weight, p=2, dim=-1)
    cost = 1 - normed @ normed.T
    return 1 - torch.exp(-sharpen * cost) if sharpen != 0 else cost


def sinkhorn_distance(p: Tensor, q: Tensor, cost: Tensor, reg: float, iterations: int) -> Tensor:
    r"""Mean over rows of :math:`\sum_{ij} \pi_{ij} C_{ij}` for the entropic transport plan
    :math:`\pi = \mathrm{diag}(u) K \mathrm{diag}(v)`, :math:`K = e^{-C/\lambda}`, after ``iterations`` Sinkhorn
    updates from :math:`u = 1/n` (``v = q / (K^T u + 1e-8)``, ``u = p / (K v + 1e-8)``); ``p``, ``q``: ``(B, n)``,
    ``cost``: ``(B, n, n)``. Gradients flow through the unrolled iterations, as in the authors' code."""
    kernel = torch.exp(-cost / reg)
    u = torch.full_like(p, 1.0 / p.shape[-1]).unsqueeze(-1)
    p, q = p.unsqueeze(-1), q.unsqueeze(-1)
    for _ in range(iterations):
        v = q / (kernel.transpose(1, 2) @ u + 1e-8)
        u = p / (kernel @ v + 1e-8)
    plan = u * kernel * v.transpose(1, 2)
    return (plan * cost).sum(dim=(-1, -2)).mean()


class WKDL(LogitTerm):
    r"""WKD-L (Lv et al., "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation",
        NeurIPS 2024): the target class as in NKD, the non-target classes by an entropic Wasserstein distance.

        With :math:`y` the label, :math:`p = \sigma(z)` and :math:`\hat p = \sigma(z_{\setminus y} / T)` over the
        :math:`K - 1` non-target classes:

        .. math::
            L_{wkd} = -\frac{1}{B}\sum_b p_{t,y}\log p_{s,y} \;+\; \gamma\,\frac{1}{B}\sum_b
                      \mathrm{WD}_\lambda\big(\hat p_{s,b}, \hat p_{t,b};\, C_{\setminus y}\big)

        :math:`\mathrm{WD}_\lambda` is :math:`\sum_{ij}\pi_{ij} C_{ij}` for the plan of ``sinkhorn_iterations``
        Sinkhorn steps at regularisation :math:`\lambda` (:func:`sinkhorn_distance`), on the cost restricted to the
        non-target classes, :math:`C = \mathrm{relu}(D) + 10^{-8}` with :math:`D = 1 - e^{-s(1 - \cos(w_i, w_j))}`:
        the cosine similarity of the teacher classifier's rows (class embeddings; ``teacher_head``), sharpened by
        ``sharpen`` :math:`s` (0: :math:`D = 1 - \cos`). The cost is read from the teacher's current weights at every
        call, without gradients. No :math:`T^2` factor. The teacher's target probability is detached. Not 0 at
        student == teacher (a cross-entropy, and the entropic plan is not the identity). Unlabelled rows (target
        ``-1``) and calls without targets use the teacher's top-1. ``standardize`` z-scores both logits first
    (:class:`~kd_lightning.losses.logits.LogitTerm`; not in the authors' method).

        :math:`\gamma` decays as the authors' loop does: for the 0-based epoch :math:`e` with :math:`e + 1 >`
        ``decay_start_epoch``, :math:`\gamma_e = \frac{\gamma}{2}(1 + \cos(\pi\frac{e + 1 - E_0}{E - E_0}))` with
        :math:`E_0` = ``decay_start_epoch``, :math:`E` = ``decay_end_epoch`` (their ``SOLVER.EPOCHS``); null
        ``decay_end_epoch`` keeps :math:`\gamma` constant. The target term is not decayed.

        Published (the authors' CIFAR-100 WKD-L, ResNet32x4 -> ResNet8x4): T = 8, :math:`\gamma` = 600,
        :math:`\lambda` = 0.05, 10 iterations, sharpen 1, CE weight 1 (``loss.alpha=0.5, loss.scale=2``), decay from
        epoch 150 of 240; ImageNet: T = 2, :math:`\gamma` = 30, decay over the whole run. Deviations: their
        published runs use a precomputed CKA cost (``wkd_cost_matrix/*.pth``, for their teachers); this term uses
        their other option, ``COST_MATRIX: fc`` (the teacher classifier's cosine similarity). Their Sinkhorn runs in
        float32 whatever the input; here in at least float32 (float64 stays float64).

        Checked against ``sinkhorn``, ``wkd_logit_loss`` and ``wkd_logit_loss_with_speration`` and the cost and
        decay of ``WKD.__init__`` / ``forward_train`` in github.com/JiamingLv/WKD, ``mdistiller/distillers/WKD.py``
        at commit 214cf8868c2b8e45781f238b8f0e47c2e4e38190; ``tests/test_mlkd_sdd_wkd.py`` compares values and
        gradients with a transcription of that code.
    """

    reads_labels = True  # splits on the target class (the teacher's top-1 where unlabelled)

    def __init__(
        self,
        gamma: float = 30.0,
        sinkhorn_lambda: float = 0.05,
        sinkhorn_iterations: int = 10,
        sharpen: float = 1.0,
        teacher_head: str = "head",
        decay_start_epoch: int = 0,
        decay_end_epoch: int | None = None,
        temperature: float | None = None,
        standardize: bool = False,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(temperature, standardize, student, teacher)
        for key, value in (("gamma", gamma), ("sinkhorn_lambda", sinkhorn_lambda), ("sharpen", sharpen)):
            check_type(value, (int, float), f"loss.terms.wkd_l.{key}")
        check_type(sinkhorn_iterations, int, "loss.terms.wkd_l.sinkhorn_iterations")
        check_type(decay_start_epoch, int, "loss.terms.wkd_l.decay_start_epoch")
        check_type(decay_end_epoch, (int, type(None)), "loss.terms.wkd_l.decay_end_epoch")
        if gamma < 0 or not sinkhorn_lambda > 0 or sinkhorn_iterations < 1:
            raise ConfigError(
                f"loss.terms.wkd_l: gamma={gamma} must be >= 0, sinkhorn_lambda={sinkhorn_lambda} > 0 and "
                f"sinkhorn_iterations={sinkhorn_iterations} >= 1 (published: 600 on CIFAR-100, 0.05, 10)"
            )
        if decay_end_epoch is not None and decay_end_epoch <= decay_start_epoch:
            raise ConfigError(
                f"loss.terms.wkd_l.decay_end_epoch={decay_end_epoch} must be > decay_start_epoch={decay_start_epoch} "
                "(the run's last epoch, e.g. ${trainer.max_epochs}), or null for a constant gamma"
            )
        self.gamma, self.sinkhorn_lambda, self.sharpen = float(gamma), float(sinkhorn_lambda), float(sharpen)
        self.sinkhorn_iterations = sinkhorn_iterations
        self.decay_start_epoch, self.decay_end_epoch = decay_start_epoch, decay_end_epoch
        self.head_path = teacher_head
        #: gamma for the current epoch (start_epoch sets it).
        self.current_gamma = self.gamma_at(0)
        #: The teacher's classifier, set by bind_models; a plain dict, so it is not registered as a submodule.
        self.heads: dict[str, nn.Module] = {}

    def gamma_at(self, epoch: int) -> float:
        """gamma at the 0-based ``epoch`` (the authors' 1-based ``epoch + 1``)."""
        start, end, authors_epoch = self.decay_start_epoch, self.decay_end_epoch, epoch + 1
        if end is None or authors_epoch <= start:
            return self.gamma
        return 0.5 * self.gamma * (1 + math.cos((authors_epoch - start) / (end - start) * math.pi))

    def start_epoch(self, epoch: int) -> None:
        self.current_gamma = self.gamma_at(epoch)

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        head = find_head(models, self.teacher_read.model, self.head_path, f"{key}.teacher_head")
        if not isinstance(getattr(head, "weight", None), Tensor) or head.weight.dim() != 2:
            raise ConfigError(
                f"{key}.teacher_head={self.head_path} has no (classes, features) weight; name the teacher's linear "
                "classifier, whose rows give WKD-L's category cost"
            )
        self.heads["teacher"] = head

    def cost(self, classes: int, like: Tensor) -> Tensor:
        """The ``(K, K)`` cost ``relu(D) + 1e-8`` from the teacher's classifier, in ``like``'s dtype and device."""
        if "teacher" not in self.heads:
            raise ConfigError(
                "loss.terms.wkd_l reads the teacher's classifier; only method=kd provides it; use method=kd"
            )
        weight = self.heads["teacher"].weight.detach().to(like)
        if weight.shape[0] != classes:
            raise ConfigError(
                f"loss.terms.wkd_l.teacher_head={self.head_path} has {weight.shape[0]} rows for {classes} classes; "
                "name the teacher's classifier"
            )
        return F.relu(classifier_cost(weight, self.sharpen)) + 1e-8

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        zs, zt = self.prepare(student), self.prepare(teacher)
        batch, classes = zs.shape
        target = resolve_targets(zt, targets)
        index = target.unsqueeze(-1)
        log_ps_target = F.log_softmax(zs, dim=-1).gather(-1, index).squeeze(-1)
        pt_target = F.softmax(zt, dim=-1).gather(-1, index).squeeze(-1).detach()
        target_term = -(pt_target * log_ps_target).mean()
        is_target = F.one_hot(target, classes).bool()
        others = non_target(torch.arange(classes, device=zs.device).expand(batch, -1), is_target)
        cost = self.cost(classes, zs)[others.unsqueeze(-1), others.unsqueeze(-2)]  # (B, K-1, K-1)
        ps = F.softmax(non_target(zs, is_target) / self.temperature, dim=-1)
        pt = F.softmax(non_target(zt, is_target) / self.temperature, dim=-1)
        distance = sinkhorn_distance(ps, pt, cost, self.sinkhorn_lambda, self.sinkhorn_iterations)
        return target_term + self.current_gamma * distance
