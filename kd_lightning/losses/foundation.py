"""Label-free feature distillation from a frozen vision foundation model (a ViT such as DINOv2)."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.losses.precision import at_least_fp32
from kd_lightning.losses.reads import ReadSpec
from kd_lightning.losses.terms import LayerTerm

POOLINGS = ("cls", "mean", None)
DISTANCES = ("cosine", "smooth_l1")


def feature_distance(a: Tensor, b: Tensor, distance: str) -> Tensor:
    r"""The mean over vectors (last dimension) of :math:`1 - \cos(a, b)` (``cosine``) or of the smooth-L1 loss
    (``smooth_l1``, Huber with :math:`\beta = 1`, averaged over every element)."""
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-8)).mean()
    return F.smooth_l1_loss(a, b)


class FoundationFeatures(LayerTerm):
    r"""Distil a frozen ViT teacher's token features (e.g. DINOv2, Oquab et al. 2023) into a student's features,
    without labels: a projection head onto the teacher's width, then a distance to its features. ``b`` is the
    teacher's token sequence ``(B, P + N, D)`` (``prefix_tokens`` = P: the class token, plus any register tokens; N
    patch tokens on a square grid, e.g. ``model.dinov2.layernorm`` of a Hugging Face Dinov2), ``a`` the student's
    feature map ``(B, C, H, W)`` or vector ``(B, C)``.

    .. math::
        L = \beta\,\big[ d(W a_{pool},\ t_{pool}) + d(\mathrm{resize}(W_p * a),\ t_{patch}) \big]

    - pooled part (``pooled``: ``cls`` = the teacher's first token, ``mean`` = the mean of its patch tokens; null:
      none): the student's map averaged over space, through a linear projection :math:`W` (``C -> D``);
    - patch part (``patch: true``): the student's map through a 1x1 convolution :math:`W_p` (``C -> D``), resized
      (bilinear) to the teacher's patch grid and compared token by token;
    - :math:`d`: :func:`feature_distance` (``distance``: ``cosine`` or ``smooth_l1``).

    The projections are sized from one example batch and train with the student (saved in its checkpoint).
    """

    has_adapters = True

    def __init__(
        self,
        student_layer: str,
        teacher_layer: str = "model.dinov2.layernorm",
        pooled: str | None = "cls",
        patch: bool = True,
        distance: str = "cosine",
        prefix_tokens: int = 1,
        beta: float = 1.0,
        student: ReadSpec = None,
        teacher: ReadSpec = None,
    ) -> None:
        super().__init__(student_layer, teacher_layer, beta, student, teacher)
        key = "method.distil.distillation.terms.features"
        if pooled not in POOLINGS:
            raise ConfigError(
                f"{key}.pooled={pooled!r} must be one of {list(POOLINGS)} (cls: the teacher's class token)"
            )
        if distance not in DISTANCES:
            raise ConfigError(f"{key}.distance={distance!r} must be one of {list(DISTANCES)}")
        if pooled is None and not patch:
            raise ConfigError(
                f"{key}: pooled=null and patch=false compare nothing; set pooled=cls (or mean) or patch=true"
            )
        if not isinstance(prefix_tokens, int) or prefix_tokens < 0 or (pooled == "cls" and prefix_tokens < 1):
            raise ConfigError(
                f"{key}.prefix_tokens={prefix_tokens!r}: the teacher's tokens before its patches (1: class)"
            )
        self.pooled, self.patch, self.distance, self.prefix_tokens = pooled, bool(patch), distance, prefix_tokens
        self.pooled_projection: nn.Module | None = None
        self.patch_projection: nn.Module | None = None

    def setup_shapes(self, student: Tensor, teacher: Tensor, key: str) -> None:
        if teacher.dim() != 3 or teacher.shape[1] <= self.prefix_tokens:
            raise ConfigError(
                f"{key}.teacher_layer must output a token sequence (B, tokens, width) with more than prefix_tokens="
                f"{self.prefix_tokens} tokens, got {tuple(teacher.shape)}; e.g. model.dinov2.layernorm"
            )
        if student.dim() not in (2, 4) or (self.patch and student.dim() != 4):
            need = "a conv map (B, C, H, W)" if self.patch else "a map (B, C, H, W) or a vector (B, C)"
            raise ConfigError(f"{key}.student_layer must output {need}, got {tuple(student.shape)}")
        patches = teacher.shape[1] - self.prefix_tokens
        if self.patch and math.isqrt(patches) ** 2 != patches:
            raise ConfigError(f"{key}: the teacher's {patches} patch tokens are not a square grid; set patch=false")
        channels, width = student.shape[1], teacher.shape[-1]
        if self.pooled is not None:
            self.pooled_projection = nn.Linear(channels, width).to(student.device)
        if self.patch:
            self.patch_projection = nn.Conv2d(channels, width, 1).to(student.device)

    def forward(self, a: Tensor, b: Tensor, targets: Tensor | None = None) -> Tensor:
        b = at_least_fp32(b.detach())
        patches = b[:, self.prefix_tokens :]
        total = a.new_zeros((), dtype=b.dtype)
        if self.pooled_projection is not None:
            pooled = a.mean(dim=(2, 3)) if a.dim() == 4 else a
            target = b[:, 0] if self.pooled == "cls" else patches.mean(dim=1)
            total = total + feature_distance(at_least_fp32(self.pooled_projection(pooled)), target, self.distance)
        if self.patch_projection is not None:
            side = math.isqrt(patches.shape[1])
            mapped = F.interpolate(self.patch_projection(a), size=(side, side), mode="bilinear", align_corners=False)
            tokens = at_least_fp32(mapped.flatten(2).transpose(1, 2))  # (B, N, D), row-major like ViT patches
            total = total + feature_distance(tokens, patches, self.distance)
        return self.beta * total
