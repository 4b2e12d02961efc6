"""``kd-sweep-report MULTIRUN_DIR``: one table (markdown + CSV) and a heatmap of a Hydra sweep.

Reads every job directory of a ``kd-distill -m ...`` sweep: the overrides it ran with
(``.hydra/overrides.yaml``) and its ``summary.json``. Jobs without a summary are listed as failed.
The parameters that vary across jobs become the table's leading columns; with exactly two, a heatmap
of the metric over them is drawn (e.g. temperature x alpha).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.engine.caching.store import write_text_atomic


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
    return varying, records, metric or "val/acc_best"


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
    best = max((r for r in records if r["value"] is not None), key=lambda r: r["value"], default=None)
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


def write_heatmap(records: list[dict[str, Any]], varying: list[str], metric: str, out_dir: Path) -> Path | None:
    """A heatmap of ``metric`` over the two varying parameters; None unless exactly two vary."""
    if len(varying) != 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_key, col_key = varying

    def ordered(key: str) -> list[str]:
        values = {r[key] for r in records}
        try:
            return sorted(values, key=float)
        except ValueError:
            return sorted(values)

    rows, cols = ordered(row_key), ordered(col_key)
    grid = [[math.nan] * len(cols) for _ in rows]
    for r in records:
        if r["value"] is not None:
            grid[rows.index(r[row_key])][cols.index(r[col_key])] = r["value"]
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2.5, 0.8 * len(rows) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_key)
    ax.set_ylabel(row_key)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            failed = math.isnan(value)
            label, color = ("failed", "k") if failed else (f"{value:.3f}", "w")
            ax.text(j, i, label, ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax, label=metric)
    ax.set_title(metric)
    fig.tight_layout()
    path = out_dir / "sweep_heatmap.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
