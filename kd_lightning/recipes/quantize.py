"""int8 post-training quantization of an exported classifier student (``kd-export --int8``).

The path: ONNX Runtime's static quantizer (``onnxruntime.quantization.quantize_static``) on the float ONNX file
kd-export wrote, calibrated on a few batches of the run's training split (MinMax ranges), QDQ format, int8
weights per output channel and uint8 activations (ONNX Runtime's default U8S8 pairing for x86-64 CPUs), after
ONNX Runtime's pre-processing (shape inference, graph optimisation). The result is one ``.onnx`` file any
ONNX Runtime can run; on the CPU it fuses the QDQ pairs into integer kernels.

Why this path and not PyTorch's PT2E flow (``prepare_pt2e`` / ``convert_pt2e`` with the X86Inductor or
XNNPACK quantizer): torch 2.13 no longer ships ``torch.ao.quantization.quantize_pt2e`` (the flow moved to the
separate ``torchao`` package), and a converted PT2E program only runs integer kernels once lowered by Inductor
or ExecuTorch; run eagerly it is a float model with quantize / dequantize steps. ONNX Runtime's quantizer
needs nothing beyond the ``deploy`` extra that the ONNX export already needs, and its output is the artefact
users deploy.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lightning.methods.classifier import unpack

#: The ONNX input name kd-export gives the student's input.
INPUT_NAME = "input"


def session(path: Path) -> Any:
    """An ONNX Runtime CPU session on ``path`` (one intra-op thread per torch thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_session(onnx_session: Any, x: Tensor) -> Tensor:
    """The session's first output on ``x`` as a float tensor."""
    return torch.from_numpy(onnx_session.run(None, {INPUT_NAME: x.detach().cpu().numpy()})[0])


class _Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` over numpy batches (subclassed lazily: onnxruntime is optional)."""

    def __init__(self, batches: Iterable[np.ndarray]) -> None:
        self.batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_batches(loader: Iterable[Any], count: int) -> list[np.ndarray]:
    """The inputs of the first ``count`` batches of ``loader`` (the run's training split) as numpy arrays."""
    return [unpack(batch)[0].detach().cpu().numpy() for batch in itertools.islice(loader, count)]


def quantize(float_onnx: Path, int8_onnx: Path, batches: list[np.ndarray]) -> None:
    """Write ``int8_onnx``: ``float_onnx`` statically quantized (QDQ, per-channel int8 weights, uint8
    activations) with ranges calibrated on ``batches``."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    reader = type("Calibration", (_Calibration, CalibrationDataReader), {})(batches)
    prepared = int8_onnx.with_name(int8_onnx.stem + ".prepared.onnx")
    try:
        quant_pre_process(str(float_onnx), str(prepared))
        quantize_static(
            str(prepared),
            str(int8_onnx),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        prepared.unlink(missing_ok=True)


@dataclass
class Int8Accuracy:
    """Test-split accuracy of the float student (the checkpoint) and its int8 model, and their top-1 agreement."""

    accuracy_float: float
    accuracy_int8: float
    agreement: float
    samples: int


@torch.inference_mode()
def compare_on(loader: Iterable[Any], student: nn.Module, int8_session: Any) -> Int8Accuracy:
    """Accuracy of ``student`` and of the int8 session on every batch of ``loader``, and their agreement."""
    float_hits = int8_hits = agree = total = 0
    for batch in loader:
        x, y, _ = unpack(batch)
        float_top = student(x).argmax(-1)
        int8_top = run_session(int8_session, x).argmax(-1)
        float_hits += int((float_top == y).sum())
        int8_hits += int((int8_top == y).sum())
        agree += int((float_top == int8_top).sum())
        total += len(y)
    return Int8Accuracy(float_hits / total, int8_hits / total, agree / total, total)
