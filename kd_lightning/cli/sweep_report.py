"""``kd-sweep-report MULTIRUN_DIR``: one table (markdown + CSV) and a plot of a Hydra sweep or Optuna search."""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_lightning.reporting.sweep_plots import write_sweep_plot
from kd_lightning.reporting.sweep_report import __doc__ as DESCRIPTION
from kd_lightning.reporting.sweep_report import read_jobs, write_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-sweep-report", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--metric", default=None, help="metric to tabulate (default: the jobs' optimized_metric)")
    args = parser.parse_args(argv)
    varying, records, metric = read_jobs(args.sweep_dir, args.metric)
    table = write_table(records, varying, metric, args.sweep_dir)
    plot = write_sweep_plot(records, varying, metric, args.sweep_dir)
    print(table.read_text())
    print(f"wrote {table}, {table.with_suffix('.csv')}" + (f", {plot}" if plot else ""))


if __name__ == "__main__":
    main()
