"""Feature terms that use a model's own linear classifier: SRD (the student's feature through the teacher's
classifier) and CAT-KD (class activation maps). The classifiers are looked up by module path when the method
binds its models (:meth:`~kd_lightning.losses.terms.DistillationTerm.bind_models`), never registered in the term.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.adapters import pointwise
from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.taps import find_module
from kd_lightning.losses.features import unsized
from kd_lightning.losses.precision import at_least_fp32, autocast_off
from kd_lightning.losses.reads import LOGITS, Read, ReadSpec
from kd_lightning.losses.terms import LayerTerm

_NORMS: dict[int, type[nn.Module]] = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}
_POOLS = {3: F.adaptive_avg_pool1d, 4: F.adaptive_avg_pool2d}


def bound_linear(models: Mapping[str, nn.Module], model: str, path: str, key: str) -> nn.Linear:
    """``models[model]``'s ``nn.Linear`` at dotted ``path``; a :class:`ConfigError` naming ``key`` otherwise."""
    if model not in models:
        raise ConfigError(f"{key}: reads model {model!r}, which this method does not have ({sorted(models)})")
    module = find_module(models[model], path, key)
    if not isinstance(module, nn.Linear):
        raise ConfigError(
            f"{key}={path!r} is a {type(module).__name__}, not an nn.Linear; name the model's linear classifier "
            "(the layer that maps its pooled or flattened features to the logits)"
        )
    return module


def classifier_input(features: Tensor, classifier: nn.Linear) -> Tensor | None:
    """How ``classifier`` reads ``features`` ``(B, C, *S)``: its input, their spatial mean (``in_features == C``)
    or their flattening (``C * prod(S)``); ``None`` when neither matches."""
    channels, positions = features.shape[1], math.prod(features.shape[2:])
    if classifier.in_features == channels:
        return features.flatten(2).mean(2) if features.dim() > 2 else features
    if classifier.in_features == channels * positions:
        return features.flatten(1)
    return None


def linear(x: Tensor, classifier: nn.Linear) -> Tensor:
    """``classifier`` applied to ``x`` in ``x``'s dtype (a frozen teacher's head may be kept in half precision)."""
    bias = None if classifier.bias is None else classifier.bias.to(x.dtype)
    return F.linear(x, classifier.weight.to(x.dtype), bias)


def spatial_mean(features: Tensor) -> Tensor:
    """``(B, C)`` per-channel means over the positions (vectors pass through)."""
    return features.flatten(2).mean(2) if features.dim() > 2 else features


class SRD(LayerTerm):
    r"""Softmax regression representation learning (Yang et al., "Knowledge Distillation via Softmax Regression
    Representation Learning", ICLR 2021; code: jingyang2017/SRD_ossl, ``train_student.py`` / ``helper/loops.py``).

    The student's last feature map :math:`F_s` goes through a connector :math:`c` (1x1 conv + BN + ReLU, as the
    authors', trained with the student, in its checkpoint) and then through the teacher's own classifier
    :math:`h_t` (``teacher_head``, an ``nn.Linear``, on the spatial mean or the flattening, whichever
    it reads), and is compared with the teacher's logits :math:`z_t`; the feature statistics are matched too:

    .. math::
        L_{srd} = \beta\Big[w_f\,\frac{1}{B C}\sum_{b,c}\big(\bar c(F_s)_{bc} - \bar F_{t,bc}\big)^2
                  + \frac{1}{B K}\big\|h_t(c(F_s)) - z_t\big\|^2\Big]

    (bars: spatial means; :math:`K` classes). ``teacher_layer`` is the teacher's map that feeds its
    classifier; the teacher's logits are read too. Gradients reach the connector and the student, never the
    teacher. Published (CIFAR-100): ``beta = 1``, ``w_f = 1`` (ShuffleNetV1 students: 10), beside CE weight 1
    (``alpha = 0.5``) and no KD term.
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        teacher_head: str = "head",
        beta: float = 1.0,
        feature_weight: float = 1.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        features = cast(Read, self.teacher_read)  # one layer: a LayerTerm reads a single Read per side
        self.teacher_read = (features, Read(features.model, LOGITS, "output", features.field))
        self.teacher_head = str(teacher_head)
        self.feature_weight = float(feature_weight)
        self.connector: nn.Module | None = None
        self._classifier: tuple[nn.Linear, ...] = ()  # a tuple: the teacher's module, not this term's

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        model = self.teacher_read[0].model
        self._classifier = (bound_linear(models, model, self.teacher_head, f"{key}.teacher_head"),)

    def setup_shapes(self, student: Tensor, teacher: list[Tensor], key: str) -> None:
        features = teacher[0]
        if not self._classifier:
            raise ConfigError(f"{key}: SRD needs the teacher's classifier, which only method=kd provides")
        rank = student.dim()
        if rank != features.dim() or rank not in _NORMS or student.shape[2:] != features.shape[2:]:
            raise ConfigError(
                f"{key}: SRD maps student features {list(student.shape)} onto teacher features {list(features.shape)} "
                "with a pointwise connector; pick layers of one rank and spatial size (the last conv maps)"
            )
        if classifier_input(features, self._classifier[0]) is None:
            raise ConfigError(
                f"{key}.teacher_head={self.teacher_head!r} takes {self._classifier[0].in_features} "
                f"features, not teacher_layer's {features.shape[1]} channels (pooled) or "
                f"{math.prod(features.shape[1:])} values (flattened); pick the map that feeds the classifier"
            )
        channels = features.shape[1]
        conv = pointwise(rank, student.shape[1], channels, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (channels * math.prod(conv.weight.shape[2:]))))
        self.connector = nn.Sequential(conv, _NORMS[rank](channels), nn.ReLU()).to(student.device)

    def forward(self, student: Tensor, teacher: list[Tensor], targets: Tensor | None = None) -> Tensor:
        features, logits = (at_least_fp32(t) for t in teacher)
        if self.connector is None or not self._classifier:
            raise unsized(self, student, features)
        mapped = at_least_fp32(self.connector(student))
        with autocast_off(mapped):
            statistics = (spatial_mean(mapped) - spatial_mean(features)).pow(2).mean()
            through_teacher = linear(classifier_input(mapped, self._classifier[0]), self._classifier[0])  # type: ignore[arg-type]
            return self.beta * (self.feature_weight * statistics + F.mse_loss(through_teacher, logits))


def class_activation_maps(features: Tensor, classifier: nn.Linear) -> Tensor:
    r"""``(B, K, *S)`` class activation maps of ``features`` ``(B, C, *S)`` under ``classifier`` (no bias): for a
    classifier on the spatial mean, :math:`M_k(s) = \sum_c W_{kc} F_c(s)`; on the flattening, with :math:`W`
    read as ``(K, C, *S)``, :math:`M_k(s) = |S| \sum_c W_{kcs} F_c(s)`. Either way the spatial mean of
    :math:`M_k` is logit :math:`k` less the bias."""
    weight = classifier.weight.to(features.dtype)
    flat = features.flatten(2)
    if classifier.in_features == features.shape[1]:
        maps = torch.einsum("kc,bcs->bks", weight, flat)
    else:
        positions = flat.shape[2]
        maps = positions * torch.einsum("kcs,bcs->bks", weight.view(weight.shape[0], -1, positions), flat)
    return maps.view(features.shape[0], -1, *features.shape[2:])


class CATKD(LayerTerm):
    r"""Class activation transfer (Guo et al., "Class Attention Transfer Based Knowledge Distillation", CVPR 2023;
    code: GzyAftermath/CAT-KD, ``mdistiller/distillers/CAT_KD.py``).

    Each model's class activation maps :math:`M` (:func:`class_activation_maps`: its last feature map through its
    own linear classifier, ``student_head`` / ``teacher_head``, without bias, as the authors'
    1x1-conv heads) are average-pooled to ``resolution`` per spatial side, each map L2-normalised over its
    positions (``normalize``), and compared by mean squared error:

    .. math::
        L_{cat} = \beta\,\mathrm{MSE}\big(\mathcal N(P_r(M_s)),\ \mathcal N(P_r(M_t))\big)

    The student's classifier gets this gradient too (it makes the student's CAMs). Student and teacher maps may
    differ in channels and spatial size; both classifiers must have the same classes. Published (CIFAR-100):
    ``beta = 400``, ``resolution = 2``, ``normalize = true`` beside CE weight 1 (``alpha = 0.5``); the code's
    binarisation and partial-CAM options (off by default) are not here.
    """

    def __init__(
        self,
        student_layer: str = "logits",
        teacher_layer: str = "logits",
        student_head: str = "head",
        teacher_head: str = "head",
        beta: float = 400.0,
        resolution: int = 2,
        normalize: bool = True,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        if int(resolution) < 1:
            raise ConfigError(f"loss.terms.catkd.resolution={resolution} must be >= 1 (2: the authors' CIFAR setting)")
        self.classifiers = {"student": str(student_head), "teacher": str(teacher_head)}
        self.resolution = int(resolution)
        self.normalize = bool(normalize)
        self._classifiers: tuple[nn.Linear, ...] = ()  # the models' own modules, not this term's

    def bind_models(self, models: Mapping[str, nn.Module], key: str) -> None:
        reads = {"student": self.student_read, "teacher": self.teacher_read}
        self._classifiers = tuple(
            bound_linear(models, reads[side].model, path, f"{key}.{side}_head")  # type: ignore[union-attr]
            for side, path in self.classifiers.items()
        )

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if not self._classifiers:
            raise ConfigError(f"{key}: CAT-KD needs the models' classifiers, which only method=kd provides")
        if student.dim() not in _POOLS or teacher.dim() != student.dim():
            raise ConfigError(
                f"{key}: CAT-KD needs conv maps of one rank (B, C, L) or (B, C, H, W), got student "
                f"{list(student.shape)} and teacher {list(teacher.shape)}; pick the maps that feed the classifiers"
            )
        for side, features, classifier in zip(self.classifiers, (student, teacher), self._classifiers, strict=True):
            if classifier_input(features, classifier) is None:
                raise ConfigError(
                    f"{key}.{side}_head={self.classifiers[side]!r} takes {classifier.in_features} features, "
                    f"not {side}_layer's {features.shape[1]} channels (pooled) or {math.prod(features.shape[1:])} "
                    "values (flattened); pick the map that feeds the classifier"
                )
        if self._classifiers[0].out_features != self._classifiers[1].out_features:
            raise ConfigError(f"{key}: the student and teacher classifiers have different class counts")

    def cams(self, features: Tensor, classifier: nn.Linear) -> Tensor:
        """Pooled (and normalised) class activation maps, ``(B, K, r[, r])``."""
        maps = class_activation_maps(at_least_fp32(features), classifier)
        maps = _POOLS[maps.dim()](maps, (self.resolution,) * (maps.dim() - 2))
        return F.normalize(maps.flatten(2), dim=2).view_as(maps) if self.normalize else maps

    def forward(self, student: Tensor, teacher: Tensor, targets: Tensor | None = None) -> Tensor:
        if not self._classifiers:
            raise unsized(self, student, teacher)
        with autocast_off(student):
            s_maps, t_maps = self.cams(student, self._classifiers[0]), self.cams(teacher, self._classifiers[1])
            return self.beta * F.mse_loss(s_maps, t_maps)
