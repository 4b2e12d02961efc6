"""``kd-export RUN_DIR``: the best student of a finished kd-distill run as ONNX / torch.export (/ int8) files."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from kd_lightning.engine.errors import ConfigError
from kd_lightning.engine.trusted import DEFAULT_TRUSTED
from kd_lightning.recipes.export import ATOL, FORMATS, OPSET, ExportError, export
from kd_lightning.recipes.export import __doc__ as DESCRIPTION
from kd_lightning.recipes.finished_run import RunDirError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kd-export", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir", type=Path, help="a kd-distill run directory (holds summary.json)")
    parser.add_argument(
        "--format",
        action="append",
        choices=[*FORMATS, "all"],
        default=None,
        help="a format to write; repeat for several (default: all = every format the student takes: hf for Hugging "
        "Face students and kd-llm-distill runs, else onnx and torch-export)",
    )
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default: {OPSET})")
    parser.add_argument(
        "--atol",
        type=float,
        default=ATOL,
        help=f"largest max-abs logit difference from the checkpoint an export may have (default: {ATOL:g})",
    )
    parser.add_argument(
        "--static-batch", action="store_true", help="export for the held batch's size only (no dynamic batch)"
    )
    parser.add_argument("--int8", action="store_true", help="also write the int8 ONNX model and its test accuracy")
    parser.add_argument(
        "--calibration-batches", type=int, default=8, help="training batches that calibrate --int8 (default: 8)"
    )
    parser.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PREFIX",
        help="also instantiate _target_s starting with PREFIX (e.g. my_pkg.) from the run's summary; by default "
        f"only {', '.join(DEFAULT_TRUSTED)}",
    )
    args = parser.parse_args(argv)
    if not args.atol >= 0:
        parser.error("--atol must be >= 0")
    if args.calibration_batches < 1:
        parser.error("--calibration-batches must be >= 1")
    formats = None if not args.format or "all" in args.format else args.format
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        export(
            args.run_dir,
            formats,
            atol=args.atol,
            opset=args.opset,
            int8=args.int8,
            calibration_batches=args.calibration_batches,
            static_batch=args.static_batch,
            trusted=(*DEFAULT_TRUSTED, *args.allow_target),
        )
    except (RunDirError, ConfigError, ExportError) as error:
        print(f"kd-export: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
