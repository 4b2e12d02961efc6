"""What kd-export wrote: one :class:`Artefact` per file, ``export/export.json`` listing them, a line per file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from kd_lightning.engine.caching.store import write_text_atomic


@dataclass
class Artefact:
    """One file kd-export wrote, as export.json lists it."""

    format: str
    file: str
    opset: int | None
    tolerance: float | None
    max_abs_diff: float | None
    size_bytes: int
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        record = asdict(self)
        return {**{k: v for k, v in record.items() if k != "extra"}, **self.extra}


def write_manifest(run: Any, artefacts: list[Artefact], held_size: int, static_batch: bool) -> dict[str, Any]:
    """``export/export.json`` listing ``artefacts``, and a line per file; returns the manifest."""
    out = run.run_dir / "export"
    manifest = {
        "run_dir": str(run.run_dir),
        "checkpoint": run.checkpoint.name,
        "held_batch": f"the first test batch ({held_size} samples)" if held_size else "the first held-out batch",
        "held_batch_size": held_size,
        "static_batch": static_batch,
        "artefacts": [artefact.record() for artefact in artefacts],
    }
    write_text_atomic(out / "export.json", json.dumps(manifest, indent=2) + "\n")
    for artefact in artefacts:
        print(describe(artefact))
    print(f"wrote {out / 'export.json'}")
    return manifest


def describe(artefact: Artefact) -> str:
    """One line per file for the terminal."""
    size = f"{artefact.size_bytes / 1024:.1f} KiB"
    if artefact.format == "onnx-int8":
        e = artefact.extra
        return (
            f"{artefact.format:13} {artefact.file:20} {size:>12}  test accuracy {100 * e['test_accuracy_int8']:.2f}% "
            f"(float {100 * e['test_accuracy_float']:.2f}%), agreement with float {100 * e['test_agreement']:.2f}%"
        )
    opset = f", opset {artefact.opset}" if artefact.opset else ""
    return (
        f"{artefact.format:13} {artefact.file:20} {size:>12}  max |diff| {artefact.max_abs_diff:.2e} "
        f"<= {artefact.tolerance:g}{opset}"
    )
