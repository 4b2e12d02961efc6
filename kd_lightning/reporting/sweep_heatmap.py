"""The heatmap of a grid sweep (``sweep_heatmap.png``): one cell per setting, mean ± std when seeds were swept,
a colour scale no wider-looking than the seed noise allows (see :func:`colour_limits`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kd_lightning.reporting.sweep_drawing import (
    BEST_COLOR,
    LABEL_BOX,
    best_of,
    contrast,
    format_value,
    new_figure,
    short,
    short_ticks,
)
from kd_lightning.reporting.sweep_report import metric_value, ordered, pooled_std

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def heatmap_figure(records: list[dict[str, Any]], varying: list[str], metric: str) -> Figure:
    import numpy as np
    from matplotlib import patheffects
    from matplotlib.patches import Rectangle

    row_key, col_key = varying
    rows, cols = ordered({r[row_key] for r in records}), ordered({r[col_key] for r in records})
    cells = {(rows.index(r[row_key]), cols.index(r[col_key])): r for r in records}
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), record in cells.items():
        if (value := metric_value(record)) is not None:
            grid[i, j] = value
    figure = new_figure(figsize=(max(4.8, 1.15 * len(cols) + 3.0), max(3.4, 0.75 * len(rows) + 2.1)))
    ax = figure.add_subplot()
    finite = grid[np.isfinite(grid)]
    limits, scale_rule = colour_limits(finite, pooled_std(records), metric)
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1])
    ax.set_xticks(range(len(cols)), [short(c) for c in cols])
    ax.set_yticks(range(len(rows)), [short(r) for r in rows])
    ax.set_xticks(np.arange(len(cols) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(rows) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=2)
    ax.tick_params(which="minor", length=0)
    ax.tick_params(which="major", length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set(xlabel=col_key, ylabel=row_key)
    best = best_of(records, metric)
    for (i, j), record in cells.items():
        value = metric_value(record)
        if record["status"] != "ok":  # failed or unreadable: the job exists and gave no result
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.92", edgecolor="0.7", hatch="///", lw=0))
            ax.text(j, i, "failed", ha="center", va="center", color="0.2", fontsize=9, bbox=LABEL_BOX)
        elif value is None:
            ax.text(j, i, "no value", ha="center", va="center", color="0.2", fontsize=9, bbox=LABEL_BOX)
        elif record is best:
            color = contrast(image.cmap(image.norm(value)))
            halo = "black" if color == "white" else "white"
            outline = Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=BEST_COLOR, lw=3.5, zorder=3)
            ax.add_patch(outline).set_clip_on(False)  # whole on the grid's edge too
            text = ax.text(j, i, f"{cell_label(record)}\nbest", ha="center", va="center", color=color)
            text.set(fontweight="bold", fontsize=11 if "\n" not in cell_label(record) else 9, linespacing=1.1)
            text.set_path_effects([patheffects.withStroke(linewidth=2.5, foreground=halo)])
        else:
            color = contrast(image.cmap(image.norm(value)))
            label = cell_label(record)
            size = 10 if "\n" not in label else 8.5
            ax.text(j, i, label, ha="center", va="center", color=color, fontsize=size, linespacing=1.1)
    if finite.size:  # no scale to show when every job failed
        colorbar = figure.colorbar(image, ax=ax, label=f"{metric}\n{scale_rule}")
        short_ticks(colorbar.ax.yaxis)
    missing = len(rows) * len(cols) - len(cells)
    seeds = sorted({r["seeds"] + r["failed"] for r in records})
    runs = "1 seed" if seeds == [1] else f"mean ± std over {'/'.join(map(str, seeds))} seeds"
    ax.set_title(f"{metric} ({runs})" + (f" (blank: {missing} not run)" if missing else ""))
    return figure


#: A one-seed sweep of an accuracy-like metric (a fraction): the colour scale spans at least this much.
ONE_SEED_SPAN = 0.05


def colour_limits(values: Any, noise: float | None, metric: str) -> tuple[tuple[float, float], str]:
    """The heatmap's colour range and the rule that set it, for its legend: the cells' range, widened about
    its middle to at least 4 pooled seed standard deviations (``noise``) when seeds were swept, so cells
    within seed noise of each other look alike; with one seed, an accuracy-like metric (``acc`` /
    ``agreement``: a fraction) spans at least ``ONE_SEED_SPAN``, any other metric its cells' range."""
    if not values.size:
        return (0.0, 1.0), ""
    low, high = float(values.min()), float(values.max())
    if noise is not None:
        span, rule = 4 * noise, f"scale ≥ ±2 seed std (±{2 * noise:.3g})"
    elif "acc" in metric or "agreement" in metric:
        span, rule = ONE_SEED_SPAN, f"1 seed: scale ≥ {ONE_SEED_SPAN:g} wide"
    else:
        span, rule = 0.0, "1 seed: scale = the cells' range"
    middle, half = (low + high) / 2, max(high - low, span) / 2
    return (middle - half, middle + half), rule


def cell_label(record: dict[str, Any]) -> str:
    """A cell's text: the value; with 2+ seeds the mean and ``± std``; over seeds, ``n=`` the seeds that gave
    a value (and how many failed)."""
    label = format_value(record["value"])
    if record["std"] is not None:
        label += f"\n± {format_value(record['std'])}"
    if record["seeds"] > 1 or record["failed"]:
        label += f"\nn={record['seeds']}" + (f", {record['failed']} failed" if record["failed"] else "")
    return label
