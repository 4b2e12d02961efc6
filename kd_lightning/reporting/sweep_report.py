"""``kd-sweep-report MULTIRUN_DIR``: one table (markdown + CSV) and a plot of a Hydra sweep.

Reads every job directory of a ``kd-distill -m ...`` sweep or an Optuna search: the overrides it ran with
(``.hydra/overrides.yaml``) and its ``summary.json``. Jobs without a summary are listed as failed.
The parameters that vary across jobs become the table's leading columns. A grid over two parameters
(``-m loss.temperature=1,2,4 loss.alpha=0.1,0.5``) is drawn as a heatmap of the metric
(``sweep_heatmap.png``: the best cell outlined, failed jobs hatched, combinations that never ran blank).
With ``seed`` swept too (``... seed=0,1,2``) each cell is one setting: its mean ± std over the seeds, and
the colour scale spans at least four pooled seed standard deviations, so differences within seed noise look
alike (a one-seed sweep says so in its title); the table then adds one row per setting with mean ± std.
A search (Optuna: sampled values, not a grid) is drawn as its trials over the two parameters, coloured
by the metric, beside the metric per trial with the running best (``sweep_trials.png``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.metrics import best as best_record

#: At most this many distinct values per parameter for a grid; more are a search's samples.
MAX_GRID_VALUES = 16
#: Parameters whose values repeat one setting (their spread is the seed noise), not settings of their own.
REPLICATE_KEYS = ("seed",)


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
    lines += seed_table(records, varying, metric)
    path = out_dir / "sweep_summary.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path


def seed_table(records: list[dict[str, Any]], varying: list[str], metric: str) -> list[str]:
    """When seeds were swept: markdown lines of one row per setting (mean ± std over its seeds, how many
    gave a value) and the best setting by mean; else nothing."""
    settings, merged = by_setting(records, varying)
    if settings == varying:
        return []
    columns = [*settings, f"{metric} (mean ± std)", "seeds"]
    lines = ["", f"Over seeds ({', '.join(k for k in varying if k not in settings)}):", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in merged:
        spread = f" ± {r['std']:.4f}" if r["std"] is not None else ""
        value = "" if r["value"] is None else f"{r['value']:.4f}{spread}"
        seeds = f"{r['seeds']}" + (f" ({r['failed']} failed)" if r["failed"] else "")
        lines.append("| " + " | ".join([*(str(r[k]) for k in settings), value, seeds]) + " |")
    best = best_record(merged, metric, lambda r: r["value"])
    if best is not None and settings:
        where = ", ".join(f"{k}={best[k]}" for k in settings)
        lines += ["", f"Best mean {metric}: {best['value']:.4f} ({where})"]
    return lines


def number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def looks_sampled(text: str) -> bool:
    """A float with more than 4 significant digits (``3.7129439...``): drawn by a sampler, not typed."""
    if number(text) is None or text.strip().lstrip("+-").isdigit():
        return False
    mantissa = text.strip().lower().split("e")[0].lstrip("+-").replace(".", "")
    return len(mantissa.strip("0")) > 4


def ordered(values: set[str]) -> list[str]:
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def metric_value(record: dict[str, Any]) -> float | None:
    """The record's metric as a finite float; None for failed / unreadable jobs and missing metrics."""
    if record["status"] != "ok" or isinstance(record["value"], bool):
        return None
    return number(record["value"])


def placed_records(records: list[dict[str, Any]], varying: list[str]) -> list[dict[str, Any]]:
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
    placed = placed_records(records, varying)
    if not varying or not placed:
        return None
    distinct = [{r[k] for r in placed} for k in varying]
    sampled = any(looks_sampled(r[k]) for r in placed for k in varying)
    if len(varying) != 2:
        return "search" if sampled or max(map(len, distinct)) > MAX_GRID_VALUES else None
    combos = [(r[varying[0]], r[varying[1]]) for r in placed]
    cells = len(distinct[0]) * len(distinct[1])
    small = max(map(len, distinct)) <= MAX_GRID_VALUES
    filled = len(combos) == cells or (2 * len(combos) >= cells and not sampled)
    return "grid" if len(set(combos)) == len(combos) and small and filled else "search"


def by_setting(records: list[dict[str, Any]], varying: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """A sweep over seeds (a varying ``REPLICATE_KEYS`` parameter) as one record per setting of the other
    parameters: ``value`` the mean over the seeds that gave one, ``std`` their sample standard deviation
    (None below 2), ``seeds`` how many gave one, ``failed`` how many did not, ``status`` ``ok`` when any
    did; ``job`` lists the jobs. Without such a parameter: the records as they are, with ``seeds`` 1 or 0."""
    replicates = [key for key in varying if key in REPLICATE_KEYS]
    settings = [key for key in varying if key not in REPLICATE_KEYS]
    if not replicates:
        return varying, [{**r, "std": None, "seeds": int(metric_value(r) is not None), "failed": 0} for r in records]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(tuple(record[key] for key in settings), []).append(record)
    merged = []
    for setting, group in groups.items():
        values = [v for v in map(metric_value, group) if v is not None]
        merged.append(
            {
                "job": ",".join(r["job"] for r in group),
                **dict(zip(settings, setting, strict=True)),
                "value": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "seeds": len(values),
                "failed": len(group) - len(values),
                "status": "ok" if values else group[0]["status"],
            }
        )
    return settings, merged


def pooled_std(records: list[dict[str, Any]]) -> float | None:
    """The seed noise of merged records (:func:`by_setting`): the pooled standard deviation over the
    settings with 2 or more seeds (None when none has)."""
    spread = [(r["seeds"] - 1, r["std"]) for r in records if r.get("std") is not None]
    dof = sum(n for n, _ in spread)
    return math.sqrt(sum(n * s * s for n, s in spread) / dof) if dof else None
