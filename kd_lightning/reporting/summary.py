"""The end-of-run summary: teacher vs student vs scratch student, sizes and wall time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kd_lightning.engine.caching.store import write_text_atomic


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


@dataclass
class Summary:
    """Everything a user wants to read after a distillation run, as a table and as JSON."""

    metrics: dict[str, float]
    student_params: int
    teacher_params: int | None = None
    adapter_params: int = 0
    teacher_source: str | None = None
    scratch: dict[str, float] | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    best_checkpoint: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    #: Per teacher: what it adds to a training step (:func:`~kd_lightning.reporting.teacher_cost.teacher_costs`).
    teacher_costs: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Multi-stage methods: one row per stage (stage, model, params, method, teacher, test_acc, ...).
    stages: list[dict[str, Any]] = field(default_factory=list)
    #: torch's CPU threads in this process (``cpu_threads``, :mod:`kd_lightning.engine.threads`).
    cpu_threads: int | None = None
    #: What else a command records (kd-llm-distill: its scheme, logit cache, per-teacher parameters).
    details: dict[str, Any] = field(default_factory=dict)
    #: Per teacher: ``params`` and ``source`` (where its weights came from); several combined: a row each.
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def compression(self) -> float | None:
        return self.teacher_params / self.student_params if self.teacher_params else None

    @property
    def kd_gain(self) -> float | None:
        """Student test accuracy minus the scratch student's (same student, data, budget, seed)."""
        if self.scratch is None or "test/acc" not in self.metrics:
            return None
        return self.metrics["test/acc"] - self.scratch["test_acc"]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "compression": self.compression, "kd_gain": self.kd_gain}

    def rows(self) -> list[tuple[str, str, str]]:
        """(quantity, value, note) rows of the summary table."""
        m = self.metrics
        if "val/ppl" in m:  # a language model (kd-llm-distill)
            return self.lm_rows() + self.size_rows()
        rows = [
            ("student test acc", _pct(m.get("test/acc")), "best-val checkpoint"),
            ("student test acc, last epoch", _pct(m.get("test/acc_last")), ""),
            ("student val acc (best)", _pct(m.get("val/acc_best")), ""),
        ]
        combined = len(self.teachers) > 1 and any(f"teacher/{name}/val_acc" in m for name in self.teachers)
        if combined:  # the teachers' accuracies are each their own; teacher/* is the combination's
            rows += self.teacher_rows()
        elif self.teacher_params is not None:
            rows += [
                ("teacher test acc", _pct(m.get("teacher/test_acc")), self.teacher_source or ""),
                ("teacher val acc", _pct(m.get("teacher/val_acc")), ""),
            ]
        if self.teacher_params is not None:
            rows += [
                ("student-teacher agreement", _pct(m.get("val/agreement")), "top-1, val"),
                ("KL(teacher || student)", f"{m.get('val/kl_to_teacher', float('nan')):.4f}", "val, T = 1"),
            ]
        rows += self.peer_rows()
        if self.scratch is not None:
            rows += [
                ("scratch student test acc", _pct(self.scratch["test_acc"]), "method=supervised, same budget, seed"),
                ("KD gain over scratch", f"{100 * self.kd_gain:+.2f} points" if self.kd_gain is not None else "—", ""),
            ]
        if "test/acc_ensemble" in m and self.stages:
            rows.append(("ensemble of stages test acc", _pct(m["test/acc_ensemble"]), "mean of softmax, best ckpts"))
        for stage in self.stages:
            model = stage["model"].rsplit(".", 1)[-1]
            note = f"{model} ({stage['params']:,}), {stage['method']}, teacher: {stage['teacher']}"
            rows.append((f"stage {stage['stage']} test acc", _pct(stage["test_acc"]), note))
        for name, cost in self.teacher_costs.items():
            memory = f"{cost['weights_mib']:.2f} MiB weights"
            if cost.get("activation_mib") is not None:
                memory += f", {cost['activation_mib']:.1f} MiB activations"
            value = "0 ms (cached)" if cost.get("cached") else f"{cost['forward_ms']:.2f} ms"
            note = f"batch of {cost['batch_size']} on {cost['device']}; {memory}"
            rows.append((f"{name} forward per step", value, note))
        return rows + self.size_rows()

    def teacher_rows(self) -> list[tuple[str, str, str]]:
        """Several teachers: each one's accuracy, parameters and source, then the combined target's (what the
        student is distilled from and compared with: ``teacher/test_acc``, ``val/agreement``)."""
        m, rows = self.metrics, []
        for name, info in self.teachers.items():
            note = f"{info.get('params', 0):,} parameters; {info.get('source') or ''}"
            rows.append((f"teacher {name} test acc", _pct(m.get(f"teacher/{name}/test_acc")), note))
            rows.append((f"teacher {name} val acc", _pct(m.get(f"teacher/{name}/val_acc")), ""))
        combine = (self.config.get("method") or {}).get("combine") or "mean"
        note = f"the target distilled: {len(self.teachers)} teachers, method.combine={combine}"
        rows.append(("combined teachers test acc", _pct(m.get("teacher/test_acc")), note))
        rows.append(("combined teachers val acc", _pct(m.get("teacher/val_acc")), ""))
        return rows

    def peer_rows(self) -> list[tuple[str, str, str]]:
        """Models trained beside the student (mutual learning's peers): each one's accuracy and their ensemble's."""
        m, rows = self.metrics, []
        peers = sorted(key.removeprefix("val/acc/") for key in m if key.startswith("val/acc/"))
        for name in peers:
            if f"test/acc/{name}" in m:
                rows.append((f"peer {name} test acc", _pct(m[f"test/acc/{name}"]), "best-val checkpoint"))
            rows.append((f"peer {name} val acc", _pct(m[f"val/acc/{name}"]), "last epoch"))
        if peers and not self.stages:
            note = "mean of every peer's softmax, the student's included"
            if "test/acc_ensemble" in m:
                rows.append(("peer ensemble test acc", _pct(m["test/acc_ensemble"]), f"{note}, best-val checkpoint"))
            if "val/acc_ensemble" in m:
                rows.append(("peer ensemble val acc", _pct(m["val/acc_ensemble"]), f"{note}, last epoch"))
        return rows

    def lm_rows(self) -> list[tuple[str, str, str]]:
        """The validation rows of a language-model run."""
        m, scheme = self.metrics, self.details.get("method", "")
        rows = [
            ("student val loss", f"{m['val/loss']:.4f}", f"llm/method={scheme}, per token"),
            ("student val perplexity", f"{m['val/ppl']:.3f}", "validation completions"),
        ]
        if "val/kl_to_teacher" in m:
            rows.append(("KL(teacher || student)", f"{m['val/kl_to_teacher']:.4f}", "val, T = 1, per token"))
        if self.details.get("logit_cache"):
            rows.append(("teacher logit cache", "top-k", str(self.details["logit_cache"])))
        return rows

    def size_rows(self) -> list[tuple[str, str, str]]:
        """Parameters and wall time."""
        rows = [("student parameters", f"{self.student_params:,}", "")]
        if self.adapter_params:
            rows.append(("loss adapters / heads", f"{self.adapter_params:,}", "trained with the student, not deployed"))
        if self.teacher_params is not None:
            rows += [
                ("teacher parameters", f"{self.teacher_params:,}", ""),
                ("compression", f"{self.compression:.1f}x", "teacher / student parameters"),
            ]
        threads = f"{self.cpu_threads} CPU threads" if self.cpu_threads else ""
        rows += [
            (f"wall time: {name.replace('_', ' ')}", f"{value:.1f} s", threads if name == "total" else "")
            for name, value in self.seconds.items()
        ]
        return rows

    def table(self) -> Table:
        table = Table(title="kd_lightning summary")
        table.add_column("quantity")
        table.add_column("value")
        table.add_column("note", overflow="fold")  # paths in full, wrapped, never cut with "…"
        for row in self.rows():
            table.add_row(*row)
        return table

    def markdown(self) -> str:
        lines = ["| quantity | value | note |", "|---|---|---|"]
        lines += [f"| {q} | {v} | {n} |" for q, v, n in self.rows()]
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # Markdown first: summary.json is the marker of a finished run, written (atomically) last.
        write_text_atomic(out_dir / "summary.md", self.markdown())
        write_text_atomic(out_dir / "summary.json", json.dumps(self.as_dict(), indent=2, sort_keys=True))

    def print(self) -> None:
        Console().print(self.table())
