"""``kd-sweep-report MULTIRUN_DIR``: one table (markdown + CSV) and a heatmap of a Hydra sweep."""

from __future__ import annotations

import argparse
from pathlib import Path

from kd_lightning.reporting.sweep_report import __doc__ as DESCRIPTION
from kd_lightning.reporting.sweep_report import read_jobs, write_heatmap, write_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-sweep-report", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory (hydra.sweep.dir)")
    parser.add_argument("--metric", default=None, help="metric to tabulate (default: the jobs' optimized_metric)")
    args = parser.parse_args(argv)
    varying, records, metric = read_jobs(args.sweep_dir, args.metric)
    table = write_table(records, varying, metric, args.sweep_dir)
    heatmap = write_heatmap(records, varying, metric, args.sweep_dir)
    print(table.read_text())
    print(f"wrote {table}, {table.with_suffix('.csv')}" + (f", {heatmap}" if heatmap else ""))


if __name__ == "__main__":
    main()
