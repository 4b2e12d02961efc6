"""A real (tiny) temperature x alpha sweep: one run dir per job, a failing job loses nothing else,
and kd-sweep-report turns the sweep into a table, a CSV and a heatmap."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import SWEEP_JOB
from tests.test_cli import run


def test_sweep_with_a_failing_job_and_its_report(kd_home: Path) -> None:
    sweep_dir = kd_home / "sweep"
    result = run(
        "kd-distill",
        "-m",
        "loss.temperature=1,4",
        "loss.alpha=0.5,1.5",
        *SWEEP_JOB,
        f"hydra.sweep.dir={sweep_dir}",
        home=kd_home,
    )
    assert result.returncode != 0  # Hydra reports the failed jobs after running the whole batch
    assert "loss.alpha=1.5 is outside [0, 1]" in result.stderr
    assert f"kd_lightning: sweep directory: {sweep_dir}" in result.stdout  # where the jobs went, printed first
    summaries = sorted(sweep_dir.glob("*/summary.json"))
    assert len(summaries) == 2  # both alpha = 0.5 jobs finished, each in its own run dir

    report = run("kd-sweep-report", str(sweep_dir), home=kd_home)
    assert report.returncode == 0, report.stderr
    with (sweep_dir / "sweep_summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["status"] for row in rows].count("ok") == 2 and len(rows) == 4
    assert {row["loss.temperature"] for row in rows} == {"1", "4"}
    assert all(0 <= float(row["val/acc_best"]) <= 1 for row in rows if row["status"] == "ok")
    assert "Best val/acc_best" in (sweep_dir / "sweep_summary.md").read_text()
    assert (sweep_dir / "sweep_heatmap.png").stat().st_size > 1000
