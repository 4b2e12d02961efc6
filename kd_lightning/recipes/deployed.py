"""kd-report's measurements of the files kd-export wrote (``RUN_DIR/export/export.json``): size on disk and
CPU latency at batch 1 (median after warm-up, the threads kd-report states) of each file, run the way it is
deployed (ONNX files in ONNX Runtime, the ``.pt2`` ExportedProgram reloaded with ``torch.export.load``), beside
the float checkpoint's student run eagerly in PyTorch.

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
    session = quantize.session(path)  # onnx, onnx-int8
    return lambda x: quantize.run_session(session, x)


def one_input(data_cfg: DictConfig) -> Tensor:
    """One sample (a batch of 1) of the run's test split."""
    datamodule = build(data_cfg, "data", **supervised_data(data_cfg))
    datamodule.prepare_data()
    datamodule.setup("test")
    return unpack(next(iter(datamodule.test_dataloader())))[0][:1].cpu()


def deployed_rows(
    run_dir: Path, data_cfg: DictConfig, student: nn.Module, student_bytes: int, timer: Timer
) -> list[list[str]]:
    """(artefact, format, size on disk in KiB, batch-1 latency in ms) rows: the float checkpoint's student first,
    then each file of ``export.json`` still on disk; empty when kd-export has not run."""
    listed = manifest(run_dir)
    if not listed or not isinstance(x := one_input(data_cfg), Tensor):
        return []
    rows = [
        [
            "student checkpoint",
            "PyTorch eager",
            f"{student_bytes / 1024:.1f}",
            f"{1000 * timer(student, x, 'student'):.3f}",
        ]
    ]
    for artefact in listed.get("artefacts", []):
        path, fmt = run_dir / "export" / str(artefact.get("file")), str(artefact.get("format"))
        if not path.is_file():
            continue
        if listed.get("static_batch"):  # exported for the held batch's size only
            timed = f"— (exported for a batch of {listed.get('held_batch_size', '?')})"
        else:
            try:
                timed = f"{1000 * timer(load(path, fmt), x, path.name):.3f}"
            except Exception as error:  # a file that no longer runs (e.g. another ONNX Runtime) is a row, not a stop
                timed = f"— (does not run: {type(error).__name__})"
        rows.append([path.name, fmt, f"{path.stat().st_size / 1024:.1f}", timed])
    return rows
