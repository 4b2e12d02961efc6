"""``kd-report RUN_DIR``: teacher and student of a finished kd-distill run, side by side on the test split."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.trusted import DEFAULT_TRUSTED
from kd_lightning.recipes.finished_run import RunDirError
from kd_lightning.recipes.report import __doc__ as DESCRIPTION
from kd_lightning.recipes.report import report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-report", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a kd-distill run directory (holds summary.json)")
    parser.add_argument("--batch-size", type=int, default=None, help="latency batch size (default: data.batch_size)")
    parser.add_argument("--repeats", type=int, default=50, help="timed forward passes per model (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed forward passes first (default: 10)")
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PREFIX",
        help="also instantiate _target_s starting with PREFIX (e.g. my_pkg.) from the run's summary; by default "
        f"only {', '.join(DEFAULT_TRUSTED)}",
    )
    parser.add_argument(
        "--cpu-threads",
        default="auto",
        metavar="N|auto",
        help="torch's CPU threads while measuring: auto (1 for models under 1M parameters, else the usable cores; "
        "as kd-distill's cpu_threads) or a number (default: auto)",
    )
    args = parser.parse_args(argv)
    if args.cpu_threads != "auto":
        if not args.cpu_threads.isdigit() or int(args.cpu_threads) < 1:
            parser.error("--cpu-threads must be auto or a number >= 1")
        args.cpu_threads = int(args.cpu_threads)
    for name in ("batch_size", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report(
            args.run_dir,
            args.batch_size,
            args.repeats,
            args.warmup,
            (*DEFAULT_TRUSTED, *args.allow_target),
            args.cpu_threads,
        )
    except (RunDirError, ConfigError) as error:
        print(f"kd-report: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
