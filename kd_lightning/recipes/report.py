"""``kd-report RUN_DIR``: teacher and student of a finished kd-distill run, side by side on the test split.

Reads the run's ``summary.json`` (its resolved config and best checkpoint), loads the student from the
best-validation checkpoint and the teacher the way the run got it (``teacher.checkpoint``, the teacher
cache, ...), then measures on the test split: accuracy, student-teacher top-1 agreement, expected
calibration error (15 bins) with a reliability diagram, parameters, size on disk (safetensors bytes of
the state dict) and CPU latency per batch (median over repeats, after warm-up). Prints a table and
writes ``report.md`` and ``reliability.png`` into the run directory.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from safetensors.torch import save
from torch import Tensor, nn

from kd_lightning.engine.batches import Inputs, repeat_rows
from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.checks import usable_cores
from kd_lightning.engine.instantiate import build, parameter_count
from kd_lightning.engine.threads import CpuThreads, set_cpu_threads
from kd_lightning.engine.trusted import DEFAULT_TRUSTED
from kd_lightning.methods.classifier import unpack
from kd_lightning.recipes.deployed import deployed_rows
from kd_lightning.recipes.finished_run import Run, load_student
from kd_lightning.recipes.fit import labelled_only
from kd_lightning.recipes.teacher import config_key, input_adapter, obtain_teacher, teacher_configs
from kd_lightning.reporting.calibration import N_BINS, ReliabilityBins, expected_calibration_error, plot_reliability
from kd_lightning.teacher_inputs import adapted


@dataclass
class Measured:
    """One model's numbers on the test split."""

    accuracy: float
    ece: float
    params: int
    size_bytes: int
    latency_s: float


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's state dict saved as safetensors."""
    return len(save({name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}))


@torch.inference_mode()
def predict(models: dict[str, nn.Module], loader: Any, progress: Progress) -> tuple[dict[str, Tensor], Tensor]:
    """Logits of every model on every batch of ``loader`` and the targets."""
    logits: dict[str, list[Tensor]] = {name: [] for name in models}
    targets = []
    task = progress.add_task("evaluating on the test split", total=len(loader))
    for batch in loader:
        x, y, _ = unpack(batch)
        for name, model in models.items():
            logits[name].append(model(x))
        targets.append(y)
        progress.advance(task)
    return {name: torch.cat(chunks) for name, chunks in logits.items()}, torch.cat(targets)


@torch.inference_mode()
def latency(model: nn.Module, batch: Inputs, repeats: int, warmup: int, progress: Progress, name: str) -> float:
    """Median wall time (s) of one forward pass on ``batch`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        model(batch)
    times = []
    for _ in progress.track(range(repeats), description=f"timing the {name} on the CPU"):
        start = time.perf_counter()
        model(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def load_models(run: Run) -> tuple[dict[str, nn.Module], str | None]:
    """The teacher (if the run had one: ``teacher_params`` set) and the student, in eval mode on the CPU,
    with where the teacher's weights came from."""
    cfg = run.cfg
    models = {"student": load_student(run)}
    source = None
    configs = teacher_configs(cfg)
    if run.summary.get("teacher_params") is not None and configs:
        name, teacher_cfg = next(iter(configs.items()))  # the teacher the run compared the student with
        teacher = build(teacher_cfg.model, f"{config_key(name)}.model")
        input = input_adapter(teacher_cfg, name)
        with tempfile.TemporaryDirectory() as scratch:  # obtain_teacher retrains there only if the cache is gone
            source = obtain_teacher(cfg, teacher_cfg, name, teacher, Path(scratch), input).source
        models = {"teacher": adapted(teacher, input), **models}
    return {name: model.cpu().eval() for name, model in models.items()}, source


def measure(
    run: Run, models: dict[str, nn.Module], batch_size: int, repeats: int, warmup: int
) -> tuple[dict[str, Measured], float | None, Tensor | None]:
    """Every model's numbers, the student-teacher agreement and the teacher's test predictions (None without a
    teacher); writes reliability.png."""
    datamodule = build(run.cfg.data, "data", **labelled_only(run.cfg.data))
    datamodule.prepare_data()
    datamodule.setup("test")
    loader = datamodule.test_dataloader()
    with Progress() as progress:
        logits, targets = predict(models, loader, progress)
        # Latency depends on the batch's shape, not its values: the first test batch, its rows repeated.
        batch = repeat_rows(unpack(next(iter(loader)))[0], batch_size)
        seconds = {name: latency(model, batch, repeats, warmup, progress, name) for name, model in models.items()}
    ece = {name: expected_calibration_error(out, targets) for name, out in logits.items()}
    bins = {name: ReliabilityBins.of(out, targets) for name, out in logits.items()}
    plot_reliability(bins, ece, run.run_dir / "reliability.png")
    measured = {
        name: Measured(
            accuracy=float((logits[name].argmax(-1) == targets).float().mean()),
            ece=ece[name],
            params=parameter_count(model),
            size_bytes=size_on_disk(model),
            latency_s=seconds[name],
        )
        for name, model in models.items()
    }
    agreement = teacher_predictions = None
    if "teacher" in logits:
        teacher_predictions = logits["teacher"].argmax(-1)
        agreement = float((logits["student"].argmax(-1) == teacher_predictions).float().mean())
    return measured, agreement, teacher_predictions


def rows(measured: dict[str, Measured], agreement: float | None, batch_size: int, repeats: int) -> list[list[str]]:
    """(quantity, teacher, student, student vs teacher) rows of the report table."""
    teacher, student = measured.get("teacher"), measured["student"]

    def row(
        quantity: str, value: Callable[[Measured], float], fmt: str, ratio: tuple[str, str] = ("", "")
    ) -> list[str]:
        times = ""
        if teacher and ratio[0] and value(student) > 0 and value(teacher) > 0:
            factor = value(teacher) / value(student)  # below 1: the student is the larger / slower one
            times = f"{factor:.1f}x {ratio[0]}" if factor >= 1 else f"{1 / factor:.1f}x {ratio[1]}"
        return [quantity, format(value(teacher), fmt) if teacher else "—", format(value(student), fmt), times]

    return [
        row("test accuracy (%)", lambda m: 100 * m.accuracy, ".2f"),
        ["top-1 agreement with the teacher (%)", "—", "—" if agreement is None else f"{100 * agreement:.2f}", ""],
        row(f"ECE, {N_BINS} bins (%)", lambda m: 100 * m.ece, ".2f"),
        row("parameters", lambda m: m.params, ",", ("fewer", "more")),
        row("size on disk (KiB, safetensors)", lambda m: m.size_bytes / 1024, ".1f", ("smaller", "larger")),
        row(
            f"CPU latency per batch of {batch_size} (ms, median of {repeats}, {torch.get_num_threads()} threads)",
            lambda m: 1000 * m.latency_s,
            ".3f",
            ("faster", "slower"),
        ),
    ]


def machine_load() -> str | None:
    """A warning when other processes kept the CPU busy (1-minute load average above half the cores
    beyond this process): latencies, and their ratios, then depend on the load."""
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load - 1.0 > 0.5 * cores:
        return (
            f"the machine was busy while timing (load average {load:.1f} on {cores} cores): latencies and "
            "their ratios are not reliable; rerun kd-report on an idle machine"
        )
    return None


#: Columns of the table of kd-export's files (:mod:`kd_lightning.recipes.deployed`), when the run has them.
DEPLOYED = ["deployed student", "format", "size on disk (KiB)", "CPU latency, batch of 1 (ms)"]
DEPLOYED += ["CPU latency, batch of 64 (ms)", "test accuracy (%)", "agreement with teacher (%)"]


def markdown(
    run: Run,
    table: list[list[str]],
    teacher_source: str | None,
    warning: str | None = None,
    deployed: Sequence[list[str]] = (),
) -> str:
    header = ["quantity", "teacher", "student", "student vs teacher"]
    exported = ["| " + " | ".join(row) + " |" for row in [DEPLOYED, ["---"] * len(DEPLOYED), *deployed]]
    lines = [
        f"# kd-report: {run.run_dir}",
        "",
        f"Student: best-validation checkpoint `{run.checkpoint}`. Teacher: {teacher_source or 'none'}.",
        f"Measured on the test split; latency on the CPU with {torch.get_num_threads()} threads.",
        *([f"**Warning:** {warning}."] if warning else []),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in table),
        "",
        *([*exported, ""] if deployed else []),
        "![reliability diagram](reliability.png)",
        "",
    ]
    return "\n".join(lines)


def report(
    run_dir: Path,
    batch_size: int | None = None,
    repeats: int = 50,
    warmup: int = 10,
    trusted: Sequence[str] = DEFAULT_TRUSTED,
    cpu_threads: CpuThreads = "auto",
) -> dict[str, Any]:
    """Measure a finished run, print the table, write ``report.md`` and ``reliability.png``; returns the numbers.
    ``trusted``: module prefixes the run's stored configs may instantiate (see :mod:`kd_lightning.engine.trusted`);
    ``cpu_threads``: torch's CPU threads for the measurement (:mod:`kd_lightning.engine.threads`)."""
    run = Run.read(run_dir, trusted)
    batch_size = batch_size or run.cfg.data.get("batch_size", 128)
    models, teacher_source = load_models(run)
    set_cpu_threads(cpu_threads, models.values(), "--cpu-threads")
    measured, agreement, teacher_predictions = measure(run, models, batch_size, repeats, warmup)
    table = rows(measured, agreement, batch_size, repeats)
    rich_table = Table(title=f"kd-report: {run_dir}")
    for column in ("quantity", "teacher", "student", "student vs teacher"):
        rich_table.add_column(column)
    for row in table:
        rich_table.add_row(*row)
    console = Console()
    console.print(rich_table)
    with Progress() as progress:  # kd-export's files, when the run has them: size and batch-1 latency
        deployed = deployed_rows(
            run.run_dir,
            run.cfg.data,
            models["student"],
            measured["student"].size_bytes,
            lambda model, x, name: latency(model, x, repeats, warmup, progress, name),
            teacher_predictions,
            (models["teacher"], measured["teacher"].size_bytes) if "teacher" in models else None,
        )
    if deployed:
        deployed_table = Table(*DEPLOYED, title=f"deployed student, {torch.get_num_threads()} CPU threads")
        for row in deployed:
            deployed_table.add_row(*row)
        console.print(deployed_table)
    warning = machine_load()
    if warning:
        console.print(f"[bold yellow]warning:[/] {warning}")
    write_text_atomic(run.run_dir / "report.md", markdown(run, table, teacher_source, warning, deployed))
    return {
        "agreement": agreement,
        "busy_warning": warning,
        "deployed": [dict(zip(DEPLOYED, row, strict=True)) for row in deployed],
        **{name: vars(numbers) for name, numbers in measured.items()},
    }
