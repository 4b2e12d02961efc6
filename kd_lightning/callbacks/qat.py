"""Quantization-aware distillation: the last epochs train the fake-quantized student against the teacher.

At the start of epoch ``max_epochs - epochs`` :class:`QuantizationAware` swaps the student's ``Linear`` /
``Conv1d`` / ``Conv2d`` layers for PyTorch's QAT modules (``torch.ao.quantization.prepare_qat``, eager mode):
weights fake-quantized to int8 per output channel (symmetric), every layer's output to uint8 (per tensor,
affine, full range), the scheme ONNX Runtime's static quantizer (``kd-export --int8``) uses. The loss, the
teacher and the optimizer are unchanged: the QAT modules hold the student's own parameters (the same tensors),
so the optimizer and its state (momentum, Adam moments) carry on. Validation in those epochs measures the
fake-quantized student (observers frozen while it runs), and the best checkpoint is chosen among those epochs
only: the weights kd-export quantizes are ones trained for int8.

Checkpoints stay float: the observers' entries are left out of every saved ``state_dict``, so a checkpoint loads
into the float student (kd-export, kd-report, resume) and the fit ends with the float layers put back (the same
parameters, now trained under fake quantization). The int8 model is then ``kd-export --int8``: ONNX Runtime's
static quantization of these weights, calibrated on training batches.

Eager-mode QAT does not fake-quantize functional operations (a residual ``x + y``) or the network's input, and
leaves BatchNorm float (ONNX Runtime folds it into the convolution before quantizing); students with other
parameterised layers (embeddings, normalisation layers other than BatchNorm, attention) are refused.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from typing_extensions import override

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.weights import in_mode

#: Layers swapped for their QAT twins (weights fake-quantized).
QUANTIZED = (nn.Linear, nn.Conv1d, nn.Conv2d)
#: Parameterised layers left float (ONNX Runtime folds BatchNorm into the convolution before it quantizes).
KEPT_FLOAT = (nn.BatchNorm1d, nn.BatchNorm2d)
#: State-dict entries of the fake-quantization modules (left out of checkpoints).
OBSERVER_KEYS = ("activation_post_process", "weight_fake_quant")


def qconfig() -> Any:
    """uint8 per-tensor affine activations (full range) and int8 per-channel symmetric weights, moving-average
    min/max ranges: ONNX Runtime's static QDQ scheme (U8S8, per-channel weights)."""
    from torch.ao import quantization as tq

    return tq.QConfig(
        activation=tq.FusedMovingAvgObsFakeQuantize.with_args(
            observer=tq.MovingAverageMinMaxObserver,
            quant_min=0,
            quant_max=255,
            dtype=torch.quint8,
            qscheme=torch.per_tensor_affine,
            reduce_range=False,
        ),
        weight=tq.FusedMovingAvgObsFakeQuantize.with_args(
            observer=tq.MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
            reduce_range=False,
        ),
    )


def check_student(student: nn.Module) -> None:
    """One line naming the key when the student has a parameterised layer QAT cannot handle."""
    for name, module in student.named_modules():
        own = any(True for _ in module.parameters(recurse=False))
        if own and not isinstance(module, QUANTIZED + KEPT_FLOAT):
            raise ConfigError(
                f"callbacks.qat fake-quantizes students built of Linear / Conv1d / Conv2d (+ BatchNorm) layers; "
                f"the student (student.model) has {type(module).__name__} at {name!r}: pick such a student or "
                "leave out callbacks=qat"
            )


class FakeQuantized:
    """A student's layers swapped for QAT modules in place, and put back by :meth:`restore`."""

    def __init__(self, student: nn.Module) -> None:
        from torch.ao import quantization as tq
        from torch.ao.nn import qat

        check_student(student)
        self.student = student
        self.float_layers = {name: m for name, m in student.named_modules() if isinstance(m, QUANTIZED)}
        mapping = {**tq.get_default_qat_module_mappings(), nn.Conv1d: qat.Conv1d}
        student.qconfig = qconfig()
        with in_mode(student, training=True), warnings.catch_warnings():  # prepare_qat asks for training mode
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization's notice
            tq.prepare_qat(student, mapping=mapping, inplace=True)

    def set_observers(self, enabled: bool) -> None:
        """Update the ranges from the batches (training) or keep them (validation)."""
        from torch.ao import quantization as tq

        self.student.apply(tq.enable_observer if enabled else tq.disable_observer)

    def restore(self) -> None:
        """The float layers back (holding the same, trained, parameters), every observer and hook removed."""
        from torch.ao.quantization.quantize import _remove_qconfig

        for name, layer in self.float_layers.items():
            self.student.set_submodule(name, layer)
        _remove_qconfig(self.student)


def float_state(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without the fake-quantization modules' entries: what the float student loads."""
    return {key: value for key, value in state.items() if not any(part in OBSERVER_KEYS for part in key.split("."))}


class QuantizationAware(L.Callback):
    """Quantization-aware distillation over the last ``epochs`` epochs (``kd-distill callbacks=qat``).

    A function of the epoch: a run resumed inside the QAT epochs swaps again (fresh observers) and goes on.
    Logs ``schedule/qat`` (1 in the fake-quantized epochs).
    """

    def __init__(self, epochs: int = 5) -> None:
        if epochs < 1:
            raise ConfigError(f"callbacks.qat.epochs={epochs} must be >= 1")
        self.epochs = epochs
        self._quantized: FakeQuantized | None = None

    def start_epoch(self, trainer: L.Trainer) -> int:
        return max(0, trainer.max_epochs - self.epochs)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not isinstance(getattr(pl_module, "student", None), nn.Module):
            raise ConfigError("callbacks.qat fake-quantizes pl_module.student; this method has none")
        if trainer.max_epochs is None or trainer.max_epochs < 1:
            raise ConfigError("callbacks.qat counts its epochs back from trainer.max_epochs; set it")
        check_student(pl_module.student)  # before the first epoch, not after most of the run

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        active = trainer.current_epoch >= self.start_epoch(trainer)
        if active and self._quantized is None:
            self._quantized = FakeQuantized(pl_module.student)
            if trainer.current_epoch == self.start_epoch(trainer):  # not again in a run resumed inside QAT
                self._forget_best(trainer)
        if self._quantized is not None:
            self._quantized.set_observers(True)
        pl_module.log("schedule/qat", float(active), on_step=False, on_epoch=True)

    @staticmethod
    def _forget_best(trainer: L.Trainer) -> None:
        """The best checkpoint is chosen among the fake-quantized epochs (the float epochs' best files stay)."""
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "monitor", None) is None:
                continue
            callback.best_k_models = {}
            callback.best_model_score = None
            callback.best_model_path = ""
            callback.kth_best_model_path = ""
            callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else float("-inf"))

    @override
    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._quantized is not None:
            self._quantized.set_observers(False)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self._quantized is not None:
            checkpoint["state_dict"] = float_state(checkpoint["state_dict"])

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._quantized is not None:
            self._quantized.restore()
            self._quantized = None

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
