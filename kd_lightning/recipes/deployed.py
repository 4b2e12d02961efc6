"""kd-report's measurements of the files kd-export wrote (``RUN_DIR/export/export.json``): size on disk, CPU
latency at batch 1 and batch 64 (median after warm-up, the threads kd-report states), test accuracy and top-1
agreement with the teacher of each file, run the way it is deployed (ONNX files in ONNX Runtime, the ``.pt2``
ExportedProgram reloaded with ``torch.export.load``), beside the float checkpoint's student run eagerly in PyTorch.

Nothing here imports kd-export's recipe (it imports kd-report's): the files are read from the manifest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from kd_lightning.engine.instantiate import build
from kd_lightning.methods.classifier import unpack
from kd_lightning.recipes import quantize
from kd_lightning.recipes.fit import supervised_data

#: (callable, input batch, name) -> seconds per call: kd-report's timing, passed in.
Timer = Callable[[Callable[[Tensor], Tensor], Tensor, str], float]


def manifest(run_dir: Path) -> dict[str, Any] | None:
    """``export/export.json`` of the run, or None when kd-export has not run (or its manifest is damaged)."""
    path = run_dir / "export" / "export.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load(path: Path, fmt: str) -> Callable[[Tensor], Tensor]:
    """The file at ``path`` as a function of the input batch, run the way it is deployed."""
    if fmt == "torch-export":
        program = torch.export.load(str(path)).module()
        return lambda x: program(x)
    if fmt == "hf":  # a save_pretrained image classifier (text students take token batches: not timed here)
        from transformers import AutoModelForImageClassification

        from kd_lightning.models.external import HFClassifier

        return HFClassifier(AutoModelForImageClassification.from_pretrained(str(path), local_files_only=True).eval())
    session = quantize.session(path)  # onnx, onnx-int8
    return lambda x: quantize.run_session(session, x)


def test_split(data_cfg: DictConfig) -> list[tuple[Tensor, Tensor]]:
    """``(inputs, targets)`` of every batch of the run's test split, on the CPU."""
    datamodule = build(data_cfg, "data", **supervised_data(data_cfg))
    datamodule.prepare_data()
    datamodule.setup("test")
    return [
        tuple(part.cpu() if isinstance(part, Tensor) else part for part in unpack(b)[:2])
        for b in datamodule.test_dataloader()
    ]


@torch.inference_mode()
def scores(run: Callable[[Tensor], Tensor], batches: list[tuple[Tensor, Tensor]], teacher: Tensor | None) -> list[str]:
    """(test accuracy %, top-1 agreement with the teacher %) of ``run`` over ``batches``."""
    predicted = torch.cat([run(x).argmax(-1) for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    agreement = f"{100 * float((predicted == teacher).float().mean()):.2f}" if teacher is not None else "—"
    return [f"{100 * float((predicted == targets).float().mean()):.2f}", agreement]


def deployed_rows(
    run_dir: Path,
    data_cfg: DictConfig,
    student: nn.Module,
    student_bytes: int,
    timer: Timer,
    teacher_predictions: Tensor | None = None,
    teacher: tuple[nn.Module, int] | None = None,
) -> list[list[str]]:
    """(artefact, format, size on disk in KiB, batch-1 and batch-64 latency in ms, test accuracy %, agreement with
    the teacher's predictions ``teacher_predictions`` %) rows: the float checkpoint's student first, then each
    file of ``export.json`` still on disk, and last the ``teacher`` (its model and bytes) for comparison; empty when
    kd-export has not run."""
    listed = manifest(run_dir)
    if not listed:
        return []
    batches = test_split(data_cfg)
    if not isinstance(batches[0][0], Tensor):
        return []
    x = batches[0][0][:1]
    x64 = x.expand(64, *x.shape[1:]).contiguous()

    def measured(run: Callable[[Tensor], Tensor], name: str) -> list[str]:
        timed = [f"{1000 * timer(run, inputs, name):.3f}" for inputs in (x, x64)]
        return [*timed, *scores(run, batches, teacher_predictions)]

    rows = [["student checkpoint", "PyTorch eager", f"{student_bytes / 1024:.1f}", *measured(student, "student")]]
    for artefact in listed.get("artefacts", []):
        path, fmt = run_dir / "export" / str(artefact.get("file")), str(artefact.get("format"))
        if not path.exists():
            continue
        size = path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if listed.get("static_batch"):  # exported for the held batch's size only
            cells = [f"— (exported for a batch of {listed.get('held_batch_size', '?')})"] + ["—"] * 3
        else:
            try:
                cells = measured(load(path, fmt), path.name)
            except Exception as error:  # a file that no longer runs (e.g. another ONNX Runtime) is a row, not a stop
                cells = [f"— (does not run: {type(error).__name__})"] + ["—"] * 3
        rows.append([path.name, fmt, f"{size / 1024:.1f}", *cells])
    if teacher is not None:
        cells = measured(teacher[0], "teacher")
        rows.append(["teacher checkpoint", "PyTorch eager", f"{teacher[1] / 1024:.1f}", *cells[:3], "—"])
    return rows
