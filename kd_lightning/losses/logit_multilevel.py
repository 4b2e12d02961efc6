"""Logit methods that look at more than one prediction per sample, each checked against its authors' code: MLKD
(instance, batch and class-level alignment over several temperatures) and SDD (logits of pooled regions of the
last feature map at several scales). The classifier lookup that SDD and WKD-L share is :func:`find_head`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError, check_positive, check_type
from kd_lightning.engine.taps import find_module
from kd_lightning.losses.logits import resolve_targets
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec, read_of
from kd_lightning.losses.terms import DistillationTerm


def find_head(models: Mapping[str, nn.Module], model: str, path: str, key: str) -> nn.Module:
    """The module at ``path`` of the model named ``model`` (its classifier); a :class:`ConfigError` naming ``key``."""
    if model not in models:
        raise ConfigError(f"{key} needs model {model!r}, which this method does not have ({sorted(models)})")
    return find_module(models[model], path, key)


def kd_rows(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Per-row ``T^2 KL(softmax(t / T) || softmax(s / T))``."""
    log_ps = F.log_softmax(student / temperature, dim=-1)
    log_pt = F.log_softmax(teacher / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1) * temperature**2


def at_or_below_median(values: Tensor) -> Tensor:
    """The fraction of ``values`` <= their median (numpy's linear-interpolation percentile 50), detached."""
    values = values.detach()
    return (values <= torch.quantile(values, 0.5)).to(values.dtype).mean()


class MLKD(DistillationTerm):
    r"""Multi-level logit distillation (Jin et al., "Multi-level Logit Distillation", CVPR 2023), on one view.

    With :math:`p^T = \sigma(z / T)` (rows: samples, columns: classes), summed over the temperatures
    :math:`T \in \mathcal T` (the authors': 2, 3, 4, 5, 6):

    .. math::
        L_{mlkd} = \sum_{T \in \mathcal T} \Big[(1 + m)\,\mathrm{KD}_T \;+\; c\,\frac{\|P_t^\top P_t - P_s^\top
                   P_s\|_F^2}{K} \;+\; m\,\frac{\|P_t P_t^\top - P_s P_s^\top\|_F^2}{B}\Big]

    the instance level :math:`\mathrm{KD}_T = T^2\,\frac{1}{B}\sum_b \mathrm{KL}(p^T_{t,b}\,\|\,p^T_{s,b})`, the
    class level (:math:`K \times K` class-relation Gram matrices) and the batch level (:math:`B \times B`
    sample-relation Gram matrices). The confidence masks, as the authors' code applies them: :math:`m` is the
    fraction of samples whose teacher confidence :math:`\max_k \sigma(z_t)_k` (at temperature 1) is at most the
    batch median, :math:`c` the fraction of classes whose summed teacher probability :math:`\sum_b \sigma(z_t)_{b,k}`
    is at most the median over classes (both ~1/2). In that code the masks multiply the already averaged loss
    (``(kd_loss(...) * mask).mean()`` with the per-sample ``reduce=False`` commented out), so they scale it by
    the fraction rather than selecting samples; this term does the same, so it is the authors' loss, not the
    per-sample selection the paper describes.

    The two views. The authors train on a weak (crop, flip) and a strong (plus RandAugment) view of each batch:
    CE on both; the masked instance, class and batch terms on the weak view; an unmasked instance term on the
    strong view (its T = 2, 6 summands in fact on the weak view); the strong-view class and batch terms are
    computed but not added. This term gets one view, the batch the data config produced, and computes the
    authors' loss with the strong view equal to it: hence the :math:`(1 + m)` (the masked weak plus the
    unmasked strong instance term). Left out: the second forward pass of both models on a RandAugment view
    (choose the augmentation in the data config; it then applies to the one view) and so the difference
    between the weak and strong instance terms. :math:`\ge 0` and 0 when the student equals the teacher.

    Published: the authors' CIFAR-100 setting is CE weight 0.1 per view (0.2 for one view standing for two)
    and weight 0.9 on the sum above, i.e. ``loss.alpha=0.5, loss.scale=0.4, loss.weights.mlkd=4.5``
    (``conf/loss/mlkd.yaml``). ``loss.temperature`` does not apply (the term has its own list).

    Checked against ``KD_ours.forward_train`` (with ``kd_loss``, ``cc_loss``, ``bc_loss``) in
    github.com/Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py`` at commit
    5ee473fcf193dfb00a0598b64d0acfe6ad58a482 (the repository names it ``KD_ours``; there is no ``MLKD.py``);
    ``tests/test_mlkd_sdd_wkd.py`` compares values and gradients with a transcription of that code.
    """

    def __init__(
        self,
        temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student, teacher)
        listed = isinstance(temperatures, Sequence) and not isinstance(temperatures, str)
        if not listed or not temperatures or not all(isinstance(t, (int, float)) and t > 0 for t in temperatures):
            raise ConfigError(
                f"loss.terms.mlkd.temperatures={temperatures} must be a non-empty list of numbers > 0 "
                "(published: [2, 3, 4, 5, 6])"
            )
        self.temperatures = [float(t) for t in temperatures]

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        zs, zt = at_least_fp32(student), at_least_fp32(teacher)
        batch, classes = zs.shape
        pt = F.softmax(zt.detach(), dim=-1)
        sample_mask = at_or_below_median(pt.max(dim=-1).values)
        class_mask = at_or_below_median(pt.sum(dim=0))
        total = zs.new_zeros(())
        for temperature in self.temperatures:
            ps_t, pt_t = F.softmax(zs / temperature, dim=-1), F.softmax(zt / temperature, dim=-1)
            instance = kd_rows(zs, zt, temperature).mean()
            class_level = (pt_t.T @ pt_t - ps_t.T @ ps_t).pow(2).sum() / classes
            batch_level = (pt_t @ pt_t.T - ps_t @ ps_t.T).pow(2).sum() / batch
            total = total + (1 + sample_mask) * instance + class_mask * class_level + sample_mask * batch_level
        return total


def region_features(feature_map: Tensor, scales: Sequence[int]) -> Tensor:
    """``(B, N, C)``: the map ``(B, C, *spatial)`` averaged over ``s^d`` regions per scale ``s`` (d spatial
    dims), scales in order, regions in row-major order; the largest scale is pooled from the map, the others
    from that (as the authors' ``SPP``: 4x4 from the map, 2x2 and 1x1 from the 4x4)."""
    pool = F.adaptive_avg_pool2d if feature_map.dim() == 4 else F.adaptive_avg_pool1d
    finest = pool(feature_map, scales[-1])
    pooled = [pool(finest, scale) if scale != scales[-1] else finest for scale in scales]
    return torch.cat([p.flatten(2) for p in pooled], dim=2).transpose(1, 2)


def default_map(spec: ReadSpec) -> dict:
    """A read of a feature map; without a layer, the input of ``pool`` (the global average pooling)."""
    spec = dict(spec or {})
    return spec if "layer" in spec else {**spec, "layer": "pool", "io": "input"}


class SDD(DistillationTerm):
    r"""Scale decoupled KD (Wei et al., "Scale Decoupled Knowledge Distillation", CVPR 2024), SDD-KD.

    The last feature map of each model is average-pooled into :math:`s \times s` regions for every scale
    :math:`s` in ``scales`` (the authors' M = [1, 2, 4]: 1 + 4 + 16 = 21 regions; 1-D maps: :math:`s`
    regions), and each region's pooled vector goes through the model's own classifier, giving region logits
    :math:`z^{(n)}` (region 0, scale 1, is the global prediction). With :math:`y` the label:

    .. math::
        L_{sdd} = \frac{1}{NB}\sum_{n,b} w_{n,b}\;T^2\,\mathrm{KL}\big(\sigma(z^{(n)}_{t,b}/T)\,\|\,
                  \sigma(z^{(n)}_{s,b}/T)\big)

    :math:`w_{n,b} = 1` for consistent regions (the teacher's region prediction is right exactly when its
    global prediction is right) and ``complementary_weight`` (the authors': 2) for complementary ones (right
    where the global is wrong, or wrong where it is right). Unlabelled rows (target ``-1``) and calls without
    targets use the teacher's global top-1 class as the label: their global prediction counts as right, so a
    region is complementary exactly when its top-1 differs from the global one.
    The student's classifier gets gradients from every region, as in the authors' code; the teacher side is
    computed without gradients. :math:`\ge 0` and 0 when the two maps and classifiers are equal.

    Requirement: the models' logits must be ``head(global average of the map)``; ``student`` / ``teacher``
    (reads ``{model, layer, io}``) name the map (default: the input of ``pool``, the global average pooling of
    every CIFAR model in ``kd_lightning.models``) and ``student_head`` / ``teacher_head`` the classifier (a
    module applied to ``(..., C)`` vectors, ``head`` there). A model without that layer (the MNIST-1D MLP and
    CNN) or a map whose channels the head does not take is refused in one line before training. The authors'
    NaN-to-zero replacement of KL entries is not copied (non-finite losses are the trainer's guard's job).

    Published: the authors' CIFAR-100 SDD-KD runs use T = 4, CE 0.1, SDD 0.9 (``loss.alpha=0.9``), M = [1, 2, 4].
    Checked against ``sdd_kd_loss`` and ``SDD_KD.forward_train`` in github.com/shicaiwei123/SDD-CVPR2024,
    ``mdistiller/distillers/KD.py``, with ``SPP`` (``mdistiller/models/cifar/utils.py``) and the region logits
    of ``mdistiller/models/cifar/resnet.py``, at commit e412036c6b7b67d8ed25418d2dedad223ab49a71;
    ``tests/test_mlkd_sdd_wkd.py`` compares values and gradients with a transcription of that code. The
    SDD-DKD and SDD-NKD variants are not implemented.
    """

    reads_labels = True  # splits on the target class (the teacher's top-1 where unlabelled)

    def __init__(
        self,
        student_head: str = "head",
        teacher_head: str = "head",
        scales: Sequence[int] = (1, 2, 4),
        complementary_weight: float = 2.0,
        temperature: float | None = None,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__()
        self.student_read = read_of(default_map(student), "student")
        self.teacher_read = read_of(default_map(teacher), "teacher")
        scales = list(scales)
        if not (scales and scales[0] == 1 and all(isinstance(s, int) for s in scales)) or any(
            b <= a or scales[-1] % a for a, b in itertools.pairwise(scales)
        ):
            raise ConfigError(
                f"loss.terms.sdd.scales={scales} must be increasing integers starting at 1 (the global prediction), "
                "each dividing the largest (published: [1, 2, 4])"
            )
        check_type(complementary_weight, (int, float), "loss.terms.sdd.complementary_weight")
        check_positive(temperature, "loss.terms.sdd.temperature", " (or null: loss.temperature)", allow_none=True)
        self.scales = scales
        self.complementary_weight = float(complementary_weight)
        self.follows_loss_temperature = temperature is None
        self.temperature = 4.0 if temperature is None else float(temperature)
        self.head_paths = {"student": student_head, "teacher": teacher_head}
        #: The two classifiers, set by bind_models; a plain dict, so they are not registered as submodules.
        self.heads: dict[str, nn.Module] = {}

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        for side, read in (("student", self.student_read), ("teacher", self.teacher_read)):
            self.heads[side] = find_head(models, read.model, self.head_paths[side], f"{key}.{side}_head")

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        for side, tensor in (("student", student), ("teacher", teacher)):
            if tensor.dim() not in (3, 4):
                raise ConfigError(
                    f"{key}.{side} reads a {tuple(tensor.shape)} tensor; SDD needs the last conv feature map "
                    "(B, C, H, W) or (B, C, L) that the classifier reads after global average pooling"
                )
            head = self.head(side, key)
            try:
                with torch.no_grad():
                    head(region_features(tensor, [1]))
            except RuntimeError as error:
                raise ConfigError(
                    f"{key}.{side}_head={self.head_paths[side]} does not take the {tensor.shape[1]} channels of "
                    f"{key}.{side}; SDD needs the map whose global average the head reads ({error})"
                ) from None

    def head(self, side: str, key: str = "loss.terms.sdd") -> nn.Module:
        if side not in self.heads:
            raise ConfigError(f"{key}: SDD reads the models' classifiers; only method=kd provides them; use method=kd")
        return self.heads[side]

    def region_logits(self, side: str, feature_map: Tensor) -> Tensor:
        """``(B, N, K)`` logits of the regions of ``feature_map`` through ``side``'s classifier (the regions in the
        classifier's dtype: a teacher run in another precision than its head, outside autocast), >= float32."""
        head = self.head(side)
        regions = region_features(feature_map, self.scales)
        weight = next(head.parameters(), None)
        if weight is not None and not torch.is_autocast_enabled(regions.device.type):
            regions = regions.to(weight.dtype)
        return at_least_fp32(head(regions))

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        zs = self.region_logits("student", student)
        with torch.no_grad():
            zt = self.region_logits("teacher", teacher)
        target = resolve_targets(zt[:, 0], targets)
        correct = zt.argmax(dim=-1) == target.unsqueeze(-1)  # (B, N)
        weights = torch.where(correct == correct[:, :1], 1.0, self.complementary_weight).to(zs.dtype)
        return (weights * kd_rows(zs, zt, self.temperature)).mean()
