r"""Random training augmentation of 1-D signals, applied per batch on the batch's device.

:class:`SignalAugmentation` re-applies, on top of the stored samples, the nuisance transformations the
MNIST-1D generator itself draws (Greydanus 2020, ``mnist1d.transform.transform``), and optionally mixup
(Zhang et al., ICLR 2018). It is the data side of *function matching* (Beyer et al., CVPR 2022,
"Knowledge distillation: A good teacher is patient and consistent"): the teacher and the student see the
identical augmented, mixed view at every step, the loss is the distillation term alone (``loss.alpha=1``),
and the schedule is long. The datamodule augments each training batch once, after it reaches the device,
and every model the method forwards reads that batch, so the views are consistent by construction.

For a batch :math:`x \in \mathbb{R}^{B \times C \times L}` (sample :math:`i`, position :math:`t = 0..L-1`),
with :math:`u_i \sim U(0, 1)` drawn afresh for every sample and every transformation, in this order
(the generator's: scale, translate, noise, shear):

* scale: :math:`x_i \leftarrow x_i \, (1 + s\,(u_i - 1/2))` (``scale`` = :math:`s`, the generator's
  ``scale_coeff``: factors in :math:`[1 - s/2, 1 + s/2]`);
* circular shift: :math:`x_{i,t} \leftarrow x_{i,(t - k_i) \bmod L}` with
  :math:`k_i \sim U\{-K, \dots, K\}` (``max_shift`` = :math:`K`; ``torch.roll(x_i, k_i)``; the generator
  translates circularly before subsampling);
* correlated noise: :math:`x_i \leftarrow x_i + \sigma_c\, (g * \epsilon_i)`, :math:`\epsilon_i \sim
  \mathcal N(0, I)`, :math:`g` a Gaussian kernel of width ``corr_noise_sigma`` (in samples) normalised to
  unit L2 norm and applied circularly, so the noise has standard deviation exactly ``corr_noise`` =
  :math:`\sigma_c` at every position (the generator smooths with ``gaussian_filter(noise, 2)`` at its
  pre-subsampling resolution, about 2x finer than the final 40 samples, and adds it to the padding only);
* iid noise: :math:`x_i \leftarrow x_i + \sigma\, \epsilon_i` (``iid_noise`` = :math:`\sigma`);
* shear: :math:`x_{i,t} \leftarrow x_{i,t} - c_i\, r_t`, :math:`c_i = h\,(u_i - 1/2)`,
  :math:`r_t = -1/2 + t/(L - 1)` (``shear`` = :math:`h`, the generator's ``shear_scale``);
* mixup (batch level): :math:`x \leftarrow \lambda x + (1 - \lambda)\, x_{\pi}` with one
  :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` per batch and :math:`\pi` a random permutation of the
  batch (``mixup_alpha`` = :math:`\alpha`; Beyer et al.'s ImageNet config uses :math:`\alpha = 1`).
  Labels are *not* mixed: a hard-label task loss on mixed inputs would be wrong, so a run with mixup must
  be pure distillation (:func:`kd_lightning.data.contract.check_label_mixing` refuses ``loss.alpha < 1`` and
  terms that read the target class, e.g. DKD).

Every knob defaults to 0 (off). Amounts are in the units of the stored data, which MNIST-1D standardises to
unit variance: the generator's own raw ``iid_noise_scale`` 0.02 and ``shear_scale`` 0.75 are about 0.13 and
4.9 there. Random numbers come from torch's global generators (of the batch's device; mixup's
:math:`\lambda` from the CPU one), which ``seed_everything`` seeds and kd_lightning checkpoints restore, so
a run with a given seed draws the same views every time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.engine.errors import ConfigError, check_type

KEY = "data.augment"


#: The per-sample fields of :class:`AugmentDraw` (first dimension: the batch); mixup's are per batch.
PER_SAMPLE_FIELDS = ("scale", "shift", "corr_noise", "iid_noise", "shear")


@dataclass(frozen=True)
class AugmentDraw:
    """The random values of one batch's augmentation (None: that transformation is off)."""

    scale: Tensor | None = None  #: (B,) multiplicative factors
    shift: Tensor | None = None  #: (B,) circular shifts (int64), ``torch.roll`` convention
    corr_noise: Tensor | None = None  #: like x: smoothed, scaled noise
    iid_noise: Tensor | None = None  #: like x: scaled noise
    shear: Tensor | None = None  #: (B,) shear coefficients
    lam: float | None = None  #: mixup coefficient in [0, 1]
    perm: Tensor | None = None  #: (B,) mixup partner of each sample

    def per_sample(self) -> dict[str, Tensor]:
        """The per-sample values that are on (a view's parameters, one row per sample); refuses mixup's
        batch-level values, which no sample owns."""
        if self.lam is not None:
            raise ValueError("a mixup draw mixes samples of one batch: it has no per-sample parameters")
        return {name: value for name in PER_SAMPLE_FIELDS if (value := getattr(self, name)) is not None}


class SignalAugmentation:
    """MNIST-1D's generator transformations plus mixup, vectorised over a batch (see the module docstring
    for the formulas). ``augment(x)`` returns a new tensor; ``draw(x)`` / ``apply(x, draw)`` split that into
    the random values and their deterministic effect.

    Args:
        max_shift: largest circular shift :math:`K` (samples); shifts are uniform in ``-K..K``.
        scale: amplitude scale range :math:`s`: factors uniform in ``[1 - s/2, 1 + s/2]``.
        shear: shear range :math:`h`: a linear ramp of slope uniform in ``[-h/2, h/2]`` over the signal.
        iid_noise: standard deviation of added white Gaussian noise.
        corr_noise: standard deviation of added smooth (correlated) Gaussian noise.
        corr_noise_sigma: width (samples) of the Gaussian kernel that correlates ``corr_noise``.
        mixup_alpha: Beta(alpha, alpha) concentration of the mixup coefficient; 0 disables mixup.
    """

    def __init__(
        self,
        max_shift: int = 0,
        scale: float = 0.0,
        shear: float = 0.0,
        iid_noise: float = 0.0,
        corr_noise: float = 0.0,
        corr_noise_sigma: float = 1.0,
        mixup_alpha: float = 0.0,
    ) -> None:
        check_type(max_shift, int, f"{KEY}.max_shift")
        if max_shift < 0:
            raise ConfigError(f"{KEY}.max_shift={max_shift} must be >= 0 (0 disables the shift)")
        amounts = {"scale": scale, "shear": shear, "iid_noise": iid_noise, "corr_noise": corr_noise}
        amounts["mixup_alpha"] = mixup_alpha
        for name, value in amounts.items():
            check_type(value, (int, float), f"{KEY}.{name}")
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{KEY}.{name}={value} must be a finite number >= 0 (0 disables it)")
        check_type(corr_noise_sigma, (int, float), f"{KEY}.corr_noise_sigma")
        if not (math.isfinite(corr_noise_sigma) and corr_noise_sigma > 0):
            raise ConfigError(f"{KEY}.corr_noise_sigma={corr_noise_sigma} must be > 0 (samples)")
        if scale > 2:
            raise ConfigError(f"{KEY}.scale={scale} would allow negative factors 1 + scale*(u - 1/2); set it <= 2")
        self.max_shift = max_shift
        self.scale = float(scale)
        self.shear = float(shear)
        self.iid_noise = float(iid_noise)
        self.corr_noise = float(corr_noise)
        self.corr_noise_sigma = float(corr_noise_sigma)
        self.mixup_alpha = float(mixup_alpha)

    def config(self) -> dict[str, Any]:
        """The knobs, as the datamodule's :meth:`content_identity` records them."""
        return {
            "max_shift": self.max_shift,
            "scale": self.scale,
            "shear": self.shear,
            "iid_noise": self.iid_noise,
            "corr_noise": self.corr_noise,
            "corr_noise_sigma": self.corr_noise_sigma,
            "mixup_alpha": self.mixup_alpha,
        }

    def __repr__(self) -> str:
        knobs = ", ".join(f"{name}={value}" for name, value in self.config().items())
        return f"{type(self).__name__}({knobs})"

    @property
    def mixes_inputs(self) -> bool:
        """Whether an augmented input is a mixture of two samples (mixup on)."""
        return self.mixup_alpha > 0

    # ---------------------------------------------------------------------------------- the draws
    def draw(self, x: Tensor, generator: torch.Generator | None = None) -> AugmentDraw:
        """This batch's random values, on ``x``'s device, from ``generator`` (default: torch's global
        generator of that device; mixup's coefficient always from the global CPU one)."""
        if x.dim() < 2 or not x.is_floating_point():
            raise ValueError(f"SignalAugmentation needs a floating batch (B, ..., L), got {x.dtype} {tuple(x.shape)}")
        batch, device = x.shape[0], x.device
        random = {"device": device, "generator": generator}

        def uniform() -> Tensor:
            return torch.rand(batch, dtype=x.dtype, **random) - 0.5

        def normal() -> Tensor:
            return torch.randn(x.shape, dtype=x.dtype, **random)

        scale = 1.0 + self.scale * uniform() if self.scale else None
        shift = None
        if self.max_shift:
            shift = torch.randint(-self.max_shift, self.max_shift + 1, (batch,), **random)
        corr = self.corr_noise * smooth(normal(), self.corr_noise_sigma) if self.corr_noise else None
        iid = self.iid_noise * normal() if self.iid_noise else None
        shear = self.shear * uniform() if self.shear else None
        lam = perm = None
        if self.mixup_alpha:
            concentration = torch.tensor(self.mixup_alpha, dtype=torch.float64)
            lam = float(torch.distributions.Beta(concentration, concentration).sample())
            perm = torch.randperm(batch, **random)
        return AugmentDraw(scale, shift, corr, iid, shear, lam, perm)

    @staticmethod
    def apply(x: Tensor, draw: AugmentDraw) -> Tensor:
        """``x`` transformed by ``draw``'s values (deterministic; a new tensor, ``x`` is left as it is)."""
        per_sample = (x.shape[0],) + (1,) * (x.dim() - 1)
        out = x
        if draw.scale is not None:
            out = out * draw.scale.view(per_sample)
        if draw.shift is not None:
            out = roll(out, draw.shift)
        if draw.corr_noise is not None:
            out = out + draw.corr_noise
        if draw.iid_noise is not None:
            out = out + draw.iid_noise
        if draw.shear is not None:
            ramp = torch.linspace(-0.5, 0.5, x.shape[-1], device=x.device, dtype=x.dtype)
            out = out - draw.shear.view(per_sample) * ramp
        if draw.lam is not None:
            out = draw.lam * out + (1.0 - draw.lam) * out[draw.perm]
        return out if out is not x else x.clone()

    def apply_per_sample(self, x: Tensor, values: Mapping[str, Tensor]) -> Tensor:
        """``x`` transformed by stored per-sample values (:meth:`AugmentDraw.per_sample` of a draw)."""
        return self.apply(x, AugmentDraw(**values))

    def __call__(self, x: Tensor) -> Tensor:
        return self.apply(x, self.draw(x))


def roll(x: Tensor, shifts: Tensor) -> Tensor:
    """Per-sample circular shift along the last dimension: ``out[i] = torch.roll(x[i], int(shifts[i]), -1)``."""
    length = x.shape[-1]
    positions = torch.arange(length, device=x.device)
    source = (positions - shifts.to(x.device).view(-1, 1)) % length  # (B, L)
    source = source.view(x.shape[0], *(1,) * (x.dim() - 2), length).expand_as(x)
    return x.gather(-1, source)


def gaussian_kernel(sigma: float, length: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A centred Gaussian kernel of width ``sigma`` (radius ``ceil(4 sigma)``, at most what a circular
    convolution over ``length`` samples allows), normalised to unit L2 norm."""
    radius = max(0, min(math.ceil(4 * sigma), (length - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float64)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    return (kernel / kernel.norm()).to(dtype)


def smooth(noise: Tensor, sigma: float) -> Tensor:
    """Circular convolution of every signal in ``noise`` (last dimension) with :func:`gaussian_kernel`: white
    noise of unit variance stays of unit variance, now correlated over about ``sigma`` samples."""
    length = noise.shape[-1]
    kernel = gaussian_kernel(sigma, length, noise.device, noise.dtype)
    radius = (kernel.numel() - 1) // 2
    flat = noise.reshape(-1, 1, length)
    padded = F.pad(flat, (radius, radius), mode="circular")
    return F.conv1d(padded, kernel.view(1, 1, -1)).view(noise.shape)
