"""The plot of a sweep (``kd-sweep-report``): a heatmap for a grid (:mod:`~kd_lightning.reporting.sweep_heatmap`),
trials and the metric per trial for a search (see :mod:`kd_lightning.reporting.sweep_report` for what is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from kd_lightning.engine.metrics import lower_is_better
from kd_lightning.reporting.sweep_drawing import (
    BEST_COLOR,
    FAILED_COLOR,
    best_of,
    format_value,
    new_figure,
    short,
    short_ticks,
)
from kd_lightning.reporting.sweep_heatmap import heatmap_figure
from kd_lightning.reporting.sweep_report import by_setting, metric_value, number, ordered, placed_records, sweep_kind

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


class SweepPlot(NamedTuple):
    """A sweep's plot: ``kind`` is ``grid`` (a heatmap) or ``search`` (trials scatter + metric per trial)."""

    kind: str
    figure: Figure


def plot_sweep(records: list[dict[str, Any]], varying: list[str], metric: str) -> SweepPlot | None:
    """The sweep's figure (not saved): a heatmap for a grid, trials + metric per trial for a search."""
    settings, merged = by_setting(records, varying)  # a sweep over seeds: one cell per setting
    kind = sweep_kind(merged, settings)
    if kind == "grid":
        return SweepPlot(kind, heatmap_figure(placed_records(merged, settings), settings, metric))
    if kind == "search":
        return SweepPlot(kind, _search_figure(records, varying, metric))
    return None


def write_sweep_plot(records: list[dict[str, Any]], varying: list[str], metric: str, out_dir: Path) -> Path | None:
    """Draws and saves the sweep's plot: ``sweep_heatmap.png`` (grid) or ``sweep_trials.png`` (search)."""
    plot = plot_sweep(records, varying, metric)
    if plot is None:
        return None
    path = out_dir / ("sweep_heatmap.png" if plot.kind == "grid" else "sweep_trials.png")
    plot.figure.savefig(path, dpi=120)
    return path


write_heatmap = write_sweep_plot  # the name kd-sweep-report used before searches got their own plot


def _trial_numbers(records: list[dict[str, Any]]) -> list[int]:
    """Hydra names a job directory by its number (Optuna's trial number); otherwise the job's position."""
    if all(r["job"].isdigit() for r in records):
        return [int(r["job"]) for r in records]
    return list(range(len(records)))


def _parameter_axis(ax: Axes, which: str, values: list[str]) -> list[float]:
    """Positions of ``values`` on the x or y axis of ``ax``, set up for them: numbers on a linear axis (log
    when positive and spanning 2 decades or more) with short labels, anything else as categories."""
    from matplotlib.ticker import NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    numbers = [number(v) for v in values]
    if any(n is None for n in numbers):
        categories = ordered(set(values))
        getattr(ax, f"set_{which}ticks")(range(len(categories)), [short(c) for c in categories])
        return [float(categories.index(v)) for v in values]
    if min(numbers) > 0 and max(numbers) >= 100 * min(numbers):
        getattr(ax, f"set_{which}scale")("log")
        axis.set_minor_formatter(NullFormatter())
    short_ticks(axis)
    return numbers


def _search_figure(records: list[dict[str, Any]], varying: list[str], metric: str) -> Figure:
    import numpy as np

    trials = np.array(_trial_numbers(records))
    values = [metric_value(r) for r in records]
    ok = np.array([v is not None for v in values])
    metric_values = np.array([np.nan if v is None else v for v in values])
    best = best_of(records, metric)
    best_index = next(i for i, r in enumerate(records) if r is best) if best is not None else None
    best_label = f"best: {format_value(metric_value(best))} (trial {trials[best_index]})" if best else None
    placed = [i for i, r in enumerate(records) if all(r[k] != "" for k in varying)]
    two = len(varying) == 2 and bool(placed)
    figure = new_figure(figsize=(11.5, 4.9) if two else (6.5, 4.6))
    figure.get_layout_engine().set(wspace=0.06)  # the colorbar's label apart from the next panel's
    axes = figure.subplots(1, 2, width_ratios=(1.2, 1)) if two else [figure.add_subplot()]
    if two:
        ax = axes[0]
        y_key, x_key = varying  # as in the heatmap: the first parameter on the rows / y axis
        x = np.array(_parameter_axis(ax, "x", [records[i][x_key] for i in placed]))
        y = np.array(_parameter_axis(ax, "y", [records[i][y_key] for i in placed]))
        placed_ok, placed_failed = ok[placed], ~ok[placed]
        if placed_ok.any():
            points = ax.scatter(
                x[placed_ok],
                y[placed_ok],
                c=metric_values[placed][placed_ok],
                cmap="viridis",
                s=46,
                edgecolors="0.2",
                linewidths=0.5,
                zorder=2,
                label="trial (colour: metric)",
            )
            colorbar = figure.colorbar(points, ax=ax, label=metric)
            short_ticks(colorbar.ax.yaxis)
        if placed_failed.any():
            ax.scatter(
                x[placed_failed], y[placed_failed], marker="x", color=FAILED_COLOR, s=46, zorder=2, label="failed trial"
            )
        if best_index is not None and best_index in placed:
            k = placed.index(best_index)
            ax.scatter(x[k], y[k], s=260, facecolors="none", edgecolors=BEST_COLOR, lw=2.2, zorder=3, label="_best")
        ax.set(xlabel=x_key, ylabel=y_key, title=f"{len(records)} trials over {y_key} x {x_key}")
    ax = axes[-1]
    order = np.argsort(trials, kind="stable")
    dots = "_trial" if two else "trial"  # two panels: the scatter's coloured points stand for the trials
    ax.plot(trials[ok], metric_values[ok], "o", color="C0", markersize=5, zorder=2, label=dots)
    if ok.any():
        running = (np.fmin if lower_is_better(metric) else np.fmax).accumulate(metric_values[order])
        ax.plot(trials[order], running, drawstyle="steps-post", color="C1", lw=2, zorder=1, label="running best")
    if (~ok).any():  # no value to place them by: a row of crosses along the bottom
        ax.plot(
            trials[~ok],
            np.full((~ok).sum(), 0.04),
            "x",
            color=FAILED_COLOR,
            markersize=7,
            transform=ax.get_xaxis_transform(),
            label="failed trial",
        )
    if best_index is not None:
        ax.scatter(
            trials[best_index],
            metric_values[best_index],
            s=260,
            facecolors="none",
            edgecolors=BEST_COLOR,
            linewidths=2.2,
            zorder=3,
            label=best_label,
        )
    ax.set_xlim(trials.min() - 0.5, trials.max() + 0.5)
    if ok.any():
        low, high = np.nanmin(metric_values), np.nanmax(metric_values)
        pad = 0.08 * (high - low) or 0.05 * abs(high) or 0.05
        ax.set_ylim(low - 2 * pad, high + pad)  # room at the bottom for the failed crosses
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    short_ticks(ax.xaxis)
    short_ticks(ax.yaxis)
    ax.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial")
    handles, labels = {}, []
    for each in axes:
        for handle, label in zip(*each.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncol=len(labels))
    return figure
