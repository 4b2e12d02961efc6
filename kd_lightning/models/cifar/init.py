"""The weight initialisation of the reference CIFAR code (RepDistiller / mdistiller), so trained accuracies can
match the published ones: He et al. (2015, "Delving Deep into Rectifiers") normal initialisation of every
convolution, :math:`W \\sim \\mathcal N(0, 2 / (k_h k_w c_{out}))` (fan-out), conv biases 0, BatchNorm scale 1
and shift 0, and, where the reference does so, linear weights :math:`\\mathcal N(0, \\sigma^2)` with bias 0."""

from __future__ import annotations

from torch import nn


def reference_init(model: nn.Module, linear_std: float | None = None, zero_linear_bias: bool = False) -> None:
    """Initialise ``model`` in place as the reference code does (see the module docstring). ``linear_std``:
    the linear layers' weights drawn from N(0, linear_std^2) and their biases zeroed (VGG, MobileNetV2: 0.01);
    None leaves them at PyTorch's default, with ``zero_linear_bias`` zeroing only the bias (WRN)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(module.weight, 0.0, linear_std)
            if linear_std is not None or zero_linear_bias:
                nn.init.zeros_(module.bias)
