"""``kd-sweep-report MULTIRUN_DIR``: one table (markdown + CSV) and a plot of a Hydra sweep.

Reads every job directory of a ``kd-distill -m ...`` sweep or an Optuna search: the overrides it ran with
(``.hydra/overrides.yaml``) and its ``summary.json``. Jobs without a summary are listed as failed.
The parameters that vary across jobs become the table's leading columns. A grid over two parameters
(``-m loss.temperature=1,2,4 loss.alpha=0.1,0.5``) is drawn as a heatmap of the metric
(``sweep_heatmap.png``: the best cell outlined, failed jobs hatched, combinations that never ran blank).
A search (Optuna: sampled values, not a grid) is drawn as its trials over the two parameters, coloured
by the metric, beside the metric per trial with the running best (``sweep_trials.png``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import yaml

from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.metrics import best as best_record
from kd_lightning.engine.metrics import lower_is_better

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


def job_dirs(sweep_dir: Path) -> list[Path]:
    jobs = [p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (len(p.name), p.name))


def parse_overrides(job: Path) -> dict[str, str]:
    try:
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
    except (yaml.YAMLError, UnicodeDecodeError):
        return {}
    items = overrides if isinstance(overrides, list) else []
    return dict(str(item).lstrip("+~").split("=", 1) for item in items if "=" in str(item))


def read_summary(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A job's summary and status: ``ok``, ``failed`` (no summary: the job did not finish) or
    ``unreadable`` (a truncated or damaged summary.json, reported without stopping the report)."""
    if not path.is_file():
        return None, "failed"
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "unreadable"
    if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
        return None, "unreadable"
    return summary, "ok"


def read_jobs(sweep_dir: Path, metric: str | None) -> tuple[list[str], list[dict[str, Any]], str]:
    """The varying parameters, one record per job (params, metric value or None, status), the metric."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise SystemExit(f"kd-sweep-report: error: no job directories with .hydra/overrides.yaml under {sweep_dir}")
    overrides = [parse_overrides(job) for job in jobs]
    keys = sorted({key for o in overrides for key in o})
    varying = [key for key in keys if len({o.get(key) for o in overrides}) > 1]
    records = []
    for job, override in zip(jobs, overrides, strict=True):
        summary, status = read_summary(job / "summary.json")
        if summary is not None and metric is None:
            metric = (summary.get("config") or {}).get("optimized_metric")
        value = summary["metrics"].get(metric) if summary and metric else None
        records.append(
            {
                "job": job.name,
                **{k: override.get(k, "") for k in varying},
                "value": value,
                "status": status,
            }
        )
    metric = metric or "val/acc_best"
    logged = sorted({name for job in jobs if (s := read_summary(job / "summary.json")[0]) for name in s["metrics"]})
    if logged and all(record["value"] is None for record in records) and metric not in logged:
        raise SystemExit(f"kd-sweep-report: error: --metric {metric} is in no job's summary; pick one of {logged}")
    return varying, records, metric


def write_table(records: list[dict[str, Any]], varying: list[str], metric: str, out_dir: Path) -> Path:
    columns = ["job", *varying, metric, "status"]
    rows = [
        [r["job"], *(r[k] for k in varying), "" if r["value"] is None else f"{r['value']:.4f}", r["status"]]
        for r in records
    ]
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    writer.writerow(columns)
    writer.writerows(rows)
    write_text_atomic(out_dir / "sweep_summary.csv", handle.getvalue())
    best = best_record(records, metric, lambda r: r["value"])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    if best is not None:
        lines += [
            "",
            f"Best {metric}: {best['value']:.4f} (job {best['job']}: "
            + ", ".join(f"{k}={best[k]}" for k in varying)
            + ")",
        ]
    path = out_dir / "sweep_summary.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


#: At most this many distinct values per parameter for a grid; more are a search's samples.
MAX_GRID_VALUES = 16
#: Up to this many characters a parameter value is its own tick label; longer numbers get 3 digits.
SHORT_LABEL = 8
#: The colour that marks the best cell / trial.
BEST_COLOR = "#d62728"
FAILED_COLOR = "0.55"
#: Behind "failed" on a hatched cell, so the hatching does not cross the word.
LABEL_BOX = {"facecolor": "0.92", "edgecolor": "none", "pad": 1.5}


class SweepPlot(NamedTuple):
    """A sweep's plot: ``kind`` is ``grid`` (a heatmap) or ``search`` (trials scatter + metric per trial)."""

    kind: str
    figure: Figure


def _number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _looks_sampled(text: str) -> bool:
    """A float with more than 4 significant digits (``3.7129439...``): drawn by a sampler, not typed."""
    if _number(text) is None or text.strip().lstrip("+-").isdigit():
        return False
    mantissa = text.strip().lower().split("e")[0].lstrip("+-").replace(".", "")
    return len(mantissa.strip("0")) > 4


def _ordered(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _short(text: str) -> str:
    """A tick label of at most ``SHORT_LABEL`` characters: the value as typed, else 3 significant digits."""
    if len(text) <= SHORT_LABEL:
        return text
    number = _number(text)
    return f"{number:.3g}" if number is not None else text[: SHORT_LABEL - 1] + "…"


def _value(record: dict[str, Any]) -> float | None:
    """The record's metric as a finite float; None for failed / unreadable jobs and missing metrics."""
    if record["status"] != "ok" or isinstance(record["value"], bool):
        return None
    return _number(record["value"])


def _placed(records: list[dict[str, Any]], varying: list[str]) -> list[dict[str, Any]]:
    """The records that have a value for every varying parameter (an unparsable overrides.yaml has none)."""
    return [r for r in records if all(r[k] != "" for k in varying)]


def sweep_kind(records: list[dict[str, Any]], varying: list[str]) -> str | None:
    """``grid``, ``search`` or None (nothing to draw).

    Two parameters form a grid when no combination repeats, each has at most ``MAX_GRID_VALUES`` values,
    and the jobs fill every cell -- or at least half of them with typed (not sampled) values, an
    interrupted grid whose missing cells stay blank. Anything else over two parameters is a search; over
    one or three or more parameters, sampled values or many distinct values make a search (drawn as the
    metric per trial), a grid is not drawn.
    """
    placed = _placed(records, varying)
    if not varying or not placed:
        return None
    distinct = [{r[k] for r in placed} for k in varying]
    sampled = any(_looks_sampled(r[k]) for r in placed for k in varying)
    if len(varying) != 2:
        return "search" if sampled or max(map(len, distinct)) > MAX_GRID_VALUES else None
    combos = [(r[varying[0]], r[varying[1]]) for r in placed]
    cells = len(distinct[0]) * len(distinct[1])
    small = max(map(len, distinct)) <= MAX_GRID_VALUES
    filled = len(combos) == cells or (2 * len(combos) >= cells and not sampled)
    return "grid" if len(set(combos)) == len(combos) and small and filled else "search"


def plot_sweep(records: list[dict[str, Any]], varying: list[str], metric: str) -> SweepPlot | None:
    """The sweep's figure (not saved): a heatmap for a grid, trials + metric per trial for a search."""
    kind = sweep_kind(records, varying)
    if kind == "grid":
        return SweepPlot(kind, _grid_figure(_placed(records, varying), varying, metric))
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


def _new_figure(**kwargs: Any) -> Figure:
    """A figure outside pyplot (no global state to close), drawn by Agg, laid out by constrained layout."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(figure)
    return figure


def _short_ticks(axis: Axis) -> None:
    """Numeric tick labels with the fewest significant digits (3 to 6) that show the ticks exactly (else that
    keep them apart); no offset text, no 16-digit floats."""
    from matplotlib.ticker import Formatter

    class Short(Formatter):
        ticks: tuple[float, ...] = ()

        def set_locs(self, locs: list[float]) -> None:
            self.ticks = tuple(locs)

        def __call__(self, x: float, pos: int | None = None) -> str:
            ticks = self.ticks or (x,)
            scale = max(abs(v) for v in ticks) or 1.0

            def clean(v: float) -> float:
                return 0.0 if abs(v) < 1e-9 * scale else v

            def exact(d: int) -> bool:
                return all(abs(float(f"{clean(v):.{d}g}") - clean(v)) <= 1e-9 * scale for v in ticks)

            def apart(d: int) -> bool:
                return len({f"{clean(v):.{d}g}" for v in ticks}) == len(set(ticks))

            digits = next((d for d in range(3, 7) if exact(d)), None) or next((d for d in range(3, 7) if apart(d)), 6)
            return f"{clean(x):.{digits}g}"

    axis.set_major_formatter(Short())


def _contrast(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever contrasts more with ``rgba`` (WCAG relative luminance)."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    red, green, blue = (linear(c) for c in rgba[:3])
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "black" if luminance > 0.179 else "white"


def _best(records: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The record with the best metric (lowest for a loss, KL, perplexity, ECE; the first of ties, as in the table)."""
    return best_record(records, metric, _value)


def _grid_figure(records: list[dict[str, Any]], varying: list[str], metric: str) -> Figure:
    import numpy as np
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    row_key, col_key = varying
    rows, cols = _ordered({r[row_key] for r in records}), _ordered({r[col_key] for r in records})
    cells = {(rows.index(r[row_key]), cols.index(r[col_key])): r for r in records}
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), record in cells.items():
        if (value := _value(record)) is not None:
            grid[i, j] = value
    figure = _new_figure(figsize=(max(4.8, 1.15 * len(cols) + 3.0), max(3.4, 0.75 * len(rows) + 2.1)))
    ax = figure.add_subplot()
    finite = grid[np.isfinite(grid)]
    limits = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(cols)), [_short(c) for c in cols])
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows])
    ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set(xlabel=col_key, ylabel=row_key)
    best = _best(records, metric)
    for (i, j), record in cells.items():
        value = _value(record)
        if record["status"] != "ok":  # failed or unreadable: the job exists and gave no result
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.92", edgecolor="0.7", hatch="///", lw=0))
            ax.text(j, i, "failed", ha="center", va="center", color="0.2", fontsize=9, bbox=LABEL_BOX)
        elif value is None:
            ax.text(j, i, "no value", ha="center", va="center", color="0.2", fontsize=9, bbox=LABEL_BOX)
        elif record is best:
            color = _contrast(image.cmap(image.norm(value)))
            halo = "black" if color == "white" else "white"
            outline = Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=BEST_COLOR, lw=3.5, zorder=3)
            ax.add_patch(outline).set_clip_on(False)  # whole on the grid's edge too
            text = ax.text(j, i, f"{_format_value(value)}\nbest", ha="center", va="center", color=color)
            text.set(fontweight="bold", fontsize=11, linespacing=1.1)
            text.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground=halo)])
        else:
            color = _contrast(image.cmap(image.norm(value)))
            ax.text(j, i, _format_value(value), ha="center", va="center", color=color, fontsize=10)
    if finite.size:  # no scale to show when every job failed
        colorbar = figure.colorbar(image, ax=ax, label=metric)
        _short_ticks(colorbar.ax.yaxis)
    missing = len(rows) * len(cols) - len(cells)
    ax.set_title(metric + (f" (blank: {missing} not run)" if missing else ""))
    return figure


def _format_value(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.4g}"


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
    numbers = [_number(v) for v in values]
    if any(n is None for n in numbers):
        categories = _ordered(set(values))
        getattr(ax, f"set_{which}ticks")(range(len(categories)), [_short(c) for c in categories])
        return [float(categories.index(v)) for v in values]
    if min(numbers) > 0 and max(numbers) >= 100 * min(numbers):
        getattr(ax, f"set_{which}scale")("log")
        axis.set_minor_formatter(NullFormatter())
    _short_ticks(axis)
    return numbers


def _search_figure(records: list[dict[str, Any]], varying: list[str], metric: str) -> Figure:
    import numpy as np

    trials = np.array(_trial_numbers(records))
    values = [_value(r) for r in records]
    ok = np.array([v is not None for v in values])
    metric_values = np.array([np.nan if v is None else v for v in values])
    best = _best(records, metric)
    best_index = next(i for i, r in enumerate(records) if r is best) if best is not None else None
    best_label = f"best: {_format_value(_value(best))} (trial {trials[best_index]})" if best else None
    placed = [i for i, r in enumerate(records) if all(r[k] != "" for k in varying)]
    two = len(varying) == 2 and bool(placed)
    figure = _new_figure(figsize=(11.5, 4.9) if two else (6.5, 4.6))
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
            _short_ticks(colorbar.ax.yaxis)
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
    _short_ticks(ax.xaxis)
    _short_ticks(ax.yaxis)
    ax.set(xlabel="trial", ylabel=metric, title=f"{metric} per trial")
    handles, labels = {}, []
    for each in axes:
        for handle, label in zip(*each.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    figure.legend([handles[label] for label in labels], labels, loc="outside lower center", ncol=len(labels))
    return figure
