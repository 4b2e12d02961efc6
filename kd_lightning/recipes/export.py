"""``kd-export RUN_DIR``: the best student of a finished kd-distill run as files to deploy, each checked.

Loads the student the way kd-report does (the run's ``summary.json``: its resolved config and best-validation
checkpoint) and writes into ``RUN_DIR/export/``:

- ``student.onnx`` (``--format onnx``): ONNX at opset 18 by default (``--opset``), written by torch's
  ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, which needs ``onnxscript``), one
  file, input ``input`` and output ``logits`` with a dynamic batch dimension; reloaded with ONNX Runtime.
- ``student.pt2`` (``--format torch-export``): a ``torch.export`` ExportedProgram saved with
  ``torch.export.save``, dynamic batch dimension; reloaded with ``torch.export.load``.
- ``student.int8.onnx`` (``--int8``): the ONNX file quantized to int8 (:mod:`kd_lightning.recipes.quantize`),
  with its test-split accuracy beside the float student's and their top-1 agreement.
- ``student_hf/`` (``--format hf``, the default for Hugging Face students and for kd-llm-distill runs): a
  ``save_pretrained`` directory with the tokenizer, reloaded offline by ``transformers``
  (:mod:`kd_lightning.recipes.export_hf`).

Every file is checked after writing: its outputs on a held batch (the first batch of the test split) must equal
the checkpoint's within ``--atol`` (default 1e-4, max absolute difference of the logits); otherwise the file is
removed and kd-export stops with one line naming what failed and the flag to change. ``export.json`` lists each
file: format, file, opset, tolerance, max abs diff, size on disk (and the int8 accuracies). Each kd-export
replaces the files an earlier one wrote, so ``export/`` holds what ``export.json`` lists. ONNX and int8 need
the ``deploy`` extra (``pip install -e '.[deploy]'``: onnx, onnxruntime, onnxscript). Students that take a
mapping of tensors (Hugging Face text students) are written with ``save_pretrained`` only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.instantiate import build
from kd_lightning.engine.trusted import DEFAULT_TRUSTED
from kd_lightning.methods.classifier import unpack
from kd_lightning.recipes import export_hf, quantize
from kd_lightning.recipes.export_manifest import Artefact, write_manifest
from kd_lightning.recipes.finished_run import Run, load_student
from kd_lightning.recipes.fit import supervised_data

log = logging.getLogger(__name__)

#: Format -> file name under RUN_DIR/export/.
FILES = {"onnx": "student.onnx", "torch-export": "student.pt2"}
#: Every --format: the files above and a save_pretrained directory.
FORMATS = (*FILES, "hf")
INT8_FILE = "student.int8.onnx"
OPSET = 18
ATOL = 1e-4
DEPLOY_EXTRA = "pip install -e '.[deploy]' (onnx, onnxruntime, onnxscript)"


class ExportError(ValueError):
    """A student that could not be exported or whose export differs from the checkpoint; one line."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of the innermost cause of an exception (exporters write pages, and wrap the
    error that names what failed), terminal colours removed."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def other_formats(fmt: str) -> str:
    """The flag that leaves ``fmt`` out: the other format(s) named with --format."""
    rest = [f for f in FILES if f != fmt]
    return f"leave it out with --format {rest[0]}" if rest else "leave it out"


def trace_hint(fmt: str, error: BaseException, static: bool) -> tuple[str, str]:
    """(what failed, what to change) for an exporter's failure to trace the student."""
    what = first_line(error)
    if "data-dependent" in what:
        change = "a branch on tensor values cannot be exported: write it with torch.cond, or "
    elif not static:
        change = "retry with --static-batch (a fixed batch size), or "
    else:
        change = ""
    return what, change + other_formats(fmt)


def dynamic_batch(static: bool) -> tuple[dict[int, Any], ...] | None:
    """The exporters' ``dynamic_shapes``: the input's first dimension (the batch) dynamic unless ``static``."""
    return None if static else ({0: torch.export.Dim("batch")},)


def export_program(student: nn.Module, x: Tensor, path: Path, static: bool) -> Callable[[Tensor], Tensor]:
    """Write ``student`` as a torch.export ExportedProgram; the reloaded program, as a function."""
    try:
        with quiet():
            program = torch.export.export(student, (x,), dynamic_shapes=dynamic_batch(static))
    except Exception as error:
        path.unlink(missing_ok=True)
        what, change = trace_hint("torch-export", error, static)
        raise ExportError(f"torch.export could not export the student ({what}); {change}") from None
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda inputs: loaded(inputs)


def export_onnx(student: nn.Module, x: Tensor, path: Path, static: bool, opset: int) -> Callable[[Tensor], Tensor]:
    """Write ``student`` as one ONNX file at ``opset``; an ONNX Runtime session on it, as a function."""
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(
            f"ONNX export needs the deploy extra ({error.name} is not installed): {DEPLOY_EXTRA}; or "
            f"{other_formats('onnx')}"
        ) from None
    try:
        with quiet():
            torch.onnx.export(
                student,
                (x,),
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=[quantize.INPUT_NAME],
                output_names=["logits"],
                dynamic_shapes=dynamic_batch(static),
                external_data=False,
                verbose=False,
            )
    except Exception as error:
        path.unlink(missing_ok=True)  # a file half written
        what, change = trace_hint("onnx", error, static)
        if "data-dependent" not in what:
            change = f"try another --opset; {change}"
        raise ExportError(f"ONNX export (opset {opset}) could not export the student ({what}); {change}") from None
    onnx_session = quantize.session(path)
    return lambda inputs: quantize.run_session(onnx_session, inputs)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters' and the quantizer's prints (torch.export prints the graph of a failed trace to stderr),
    INFO logs and deprecation warnings silenced; kd-export reports what failed in one line instead."""
    names = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "onnx_ir")
    names = (*names, "onnxruntime")
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with (
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@torch.inference_mode()
def check(
    fmt: str, path: Path, exported: Callable[[Tensor], Tensor], student: nn.Module, x: Tensor, atol: float
) -> float:
    """The max abs difference of ``exported``'s logits from the checkpoint's on the held batch ``x``; above
    ``atol`` (or another shape) the file is removed and kd-export stops."""
    expected, got = student(x), exported(x)
    if got.shape != expected.shape:
        path.unlink(missing_ok=True)
        raise ExportError(
            f"the {fmt} export ({path.name}) returns logits of shape {tuple(got.shape)}, the checkpoint "
            f"{tuple(expected.shape)}; {other_formats(fmt)}"
        )
    diff = float((got.float() - expected.float()).abs().max())
    if not diff <= atol:  # NaN fails too
        path.unlink(missing_ok=True)
        raise ExportError(
            f"the {fmt} export ({path.name}) differs from the checkpoint by {diff:.3g} (max abs logit difference "
            f"on a held test batch of {len(x)}), above --atol {atol:g}; raise --atol or {other_formats(fmt)}"
        )
    return diff


def held_inputs(loader: Any) -> Tensor:
    """The first test batch's inputs: a tensor (students taking a mapping of tensors are not exported yet)."""
    x = unpack(next(iter(loader)))[0]
    if not isinstance(x, Tensor):
        raise ExportError(
            "the student takes a mapping of tensors (a Hugging Face text student): ONNX and torch.export take one "
            "tensor input; use --format hf (save_pretrained)"
        )
    return x.cpu()


def export(
    run_dir: Path,
    formats: Sequence[str] | None = None,
    atol: float = ATOL,
    opset: int = OPSET,
    int8: bool = False,
    calibration_batches: int = 8,
    static_batch: bool = False,
    trusted: Sequence[str] = DEFAULT_TRUSTED,
) -> dict[str, Any]:
    """Export the run's best student into ``run_dir/export/``, check each file, write ``export.json``; returns
    the manifest. ``formats`` None: ``hf`` for a Hugging Face student, else ONNX and torch.export. ``int8``
    also writes the int8 ONNX model (it needs the ONNX export, which it adds)."""
    run = Run.read(run_dir, trusted)
    out = run.run_dir / "export"
    out.mkdir(exist_ok=True)
    for name in (*FILES.values(), INT8_FILE, "export.json"):  # each kd-export replaces the last one's files
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / export_hf.HF_DIR, ignore_errors=True)
    if run.cfg.get("llm") is not None:  # a kd-llm-distill run: its causal-LM student
        if (formats is not None and set(formats) != {"hf"}) or int8:
            raise ExportError("a kd-llm-distill run's student is written with --format hf only (no --int8)")
        record = export_hf.export_lm(run, atol, trusted)
        written = Artefact("hf", record["file"], None, atol, record["max_abs_diff"], record["size_bytes"])
        return write_manifest(run, [written], 0, False)
    student = load_student(run).cpu().eval()
    if formats is None:
        formats = ["hf"] if export_hf.is_hf_classifier(student) else list(FILES)
    formats = list(dict.fromkeys([*formats, *(["onnx"] if int8 else [])]))
    datamodule = build(run.cfg.data, "data", **supervised_data(run.cfg.data))
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    artefacts, x = [], None
    if "hf" in formats:
        held = unpack(next(iter(datamodule.test_dataloader())))[0]
        record = export_hf.export_classifier(student, run.cfg.data, held, out, atol)
        artefacts.append(Artefact("hf", record["file"], None, atol, record["max_abs_diff"], record["size_bytes"]))
    if set(formats) - {"hf"}:
        x = held_inputs(datamodule.test_dataloader())
    for fmt in (f for f in formats if f != "hf"):
        path = out / FILES[fmt]
        if fmt == "onnx":
            exported = export_onnx(student, x, path, static_batch, opset)
        else:
            exported = export_program(student, x, path, static_batch)
        diff = check(fmt, path, exported, student, x, atol)
        artefacts.append(Artefact(fmt, path.name, opset if fmt == "onnx" else None, atol, diff, path.stat().st_size))
    if int8:
        artefacts.append(export_int8(run, student, datamodule, out / FILES["onnx"], calibration_batches))
    return write_manifest(run, artefacts, len(x) if x is not None else 0, static_batch)


def export_int8(run: Run, student: nn.Module, datamodule: Any, float_onnx: Path, batches: int) -> Artefact:
    """The int8 ONNX model of ``float_onnx``, calibrated on ``batches`` training batches, with its accuracy."""
    int8_path = float_onnx.with_name(INT8_FILE)
    torch.manual_seed(int(run.cfg.get("seed") or 0))  # which training batches calibrate
    calibration = quantize.calibration_batches(datamodule.train_dataloader(), batches)
    try:
        with quiet():
            quantize.quantize(float_onnx, int8_path, calibration)
        accuracy = quantize.compare_on(datamodule.test_dataloader(), student, quantize.session(int8_path))
    except Exception as error:
        int8_path.unlink(missing_ok=True)
        failed = f"int8 quantization of {float_onnx.name} failed ({first_line(error)})"
        raise ExportError(f"{failed}; leave out --int8") from None
    extra = {
        "method": "onnxruntime quantize_static, QDQ, per-channel int8 weights, uint8 activations, MinMax",
        "calibration_batches": len(calibration),
        "calibration_samples": sum(len(b) for b in calibration),
        **{f"test_{key}" if key != "samples" else "test_samples": value for key, value in asdict(accuracy).items()},
    }
    return Artefact("onnx-int8", int8_path.name, None, None, None, int8_path.stat().st_size, extra)
