"""The deployment table: the distilled student float, int8 by post-training quantization, and int8 after
quantization-aware distillation, over seeds, beside the teacher.

    OMP_NUM_THREADS=1 python scripts/deploy_table.py      # seeds 0 1 2, the default run: docs/results/deploy.md
    OMP_NUM_THREADS=1 .venv-vision/bin/python scripts/deploy_table.py --preset digits_resnet18_mobilenetv2
    python scripts/deploy_table.py --seeds 0 --out /tmp/deploy.md -- trainer.max_epochs=2

Each preset's table is its own section of ``--out`` (the default run's: ``deploy-default``), so one page holds them.

Runs, in a fresh KD_LIGHTNING_HOME (teachers trained once per seed, shared by both sweeps):
1. ``kd-distill -m seed=...``: the default distillation, then ``kd-export RUN_DIR --int8`` on each run: the float
   student's test accuracy (the checkpoint) and its int8 model's (ONNX Runtime static PTQ, calibrated on training
   batches);
2. ``kd-distill -m seed=... callbacks=qat callbacks.qat.epochs=<N>``: the same run whose last N epochs train the
   fake-quantized student against the teacher, then ``kd-export RUN_DIR --int8`` on each;
3. ``kd-report`` on every run (one CPU thread): each file's and the teacher's latency at batch 1 and 64 (median
   after warm-up) and top-1 agreement with the teacher over the test split. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from multirun import mean_std, provenance, run_seeds

from kd_lightning.reporting.markdown import write_section

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "deploy.md"
KD_EXPORT = Path(sys.executable).with_name("kd-export")


def exported(sweep_dir: Path, home: Path) -> list[dict]:
    """``kd-export RUN_DIR --int8`` on every run of ``sweep_dir``: their export.json manifests, by seed order."""
    manifests = []
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        run_dir = summary.parent
        print(f"$ kd-export {run_dir} --int8", flush=True)
        env = {**os.environ, "KD_LIGHTNING_HOME": str(home)}
        subprocess.run([str(KD_EXPORT), str(run_dir), "--int8"], check=True, stdout=subprocess.DEVNULL, env=env)
        manifests.append(json.loads((run_dir / "export" / "export.json").read_text()))
    return manifests


def reported(sweep_dir: Path) -> list[dict[str, dict[str, str]]]:
    """kd-report's deployed-files rows of every run of ``sweep_dir`` (one CPU thread), by seed order."""
    from kd_lightning.recipes.report import report

    rows = []
    for summary in sorted(sweep_dir.glob("*/summary.json")):
        numbers = report(summary.parent, repeats=50, warmup=10, cpu_threads=1)
        rows.append({row["deployed student"]: row for row in numbers["deployed"]})
    return rows


def data_description(cfg: dict, preset: str | None) -> str:
    """What the runs trained on, from their config: the datamodule and, with a transfer set, its size."""
    data = cfg["data"]
    name = data["_target_"].rsplit(".", 1)[-1].removesuffix("DataModule")
    transfer = data.get("transfer_samples")
    extra = f", {transfer:,} unlabelled transfer samples" if transfer else ""
    size = data.get("resolution")
    shape = f", {size}x{size} px, {data['channels']} channel(s)" if size else ""
    return f"{name} ({f'experiment={preset}' if preset else 'the default run'}{shape}{extra})"


def column(rows: list[dict[str, dict[str, str]]], name: str, key: str) -> str:
    """Mean ± std over runs of one cell of kd-report's deployed table (latencies to the microsecond)."""
    return mean_std([float(row[name][key]) for row in rows], scale=1.0, digits=3 if "latency" in key else 2)


def entry(manifest: dict, fmt: str) -> dict:
    return next(artefact for artefact in manifest["artefacts"] if artefact["format"] == fmt)


def kib(sizes: list[int]) -> str:
    return f"{statistics.mean(sizes) / 1024:.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--qat-epochs", type=int, default=10, help="callbacks.qat.epochs: the fake-quantized epochs")
    parser.add_argument("--preset", help="a conf/experiment name (default: the default run)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="keep the runs here (default: a temporary directory); rerunning with the same --root reuses the "
        "finished sweeps and measures again (e.g. train on a busy machine, measure latency on an idle one)",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.root or Path(scratch)
        home = Path(tmp) / "home"
        preset = [f"experiment={args.preset}"] if args.preset else []
        base = [*preset, *args.overrides, "compare_scratch=false"]
        kd = run_seeds(base, args.seeds, Path(tmp) / "kd", home)
        kd_export = exported(Path(tmp) / "kd", home)
        qat_overrides = [*base, "callbacks=qat", f"callbacks.qat.epochs={args.qat_epochs}"]
        qat = run_seeds(qat_overrides, args.seeds, Path(tmp) / "qat", home)
        qat_export = exported(Path(tmp) / "qat", home)
        kd_report, qat_report = reported(Path(tmp) / "kd"), reported(Path(tmp) / "qat")

    def acc(manifests: list[dict], key: str) -> str:
        return mean_std([entry(m, "onnx-int8")[key] for m in manifests])

    def size(manifests: list[dict], fmt: str) -> str:
        return kib([entry(m, fmt)["size_bytes"] for m in manifests])

    cfg = kd[0]["config"]
    epochs = cfg["trainer"]["max_epochs"]
    model = cfg["student"]["model"]
    student = model.get("name") or model["_target_"].rsplit(".", 1)[-1]

    def timing(rows: list[dict], name: str, agreement: bool = True) -> tuple[str, ...]:
        keys = ["agreement with teacher (%)"] if agreement else []
        return tuple(column(rows, name, key) for key in [*keys, *(f"CPU latency, batch of {n} (ms)" for n in (1, 64))])

    teacher = "teacher checkpoint"
    teacher_kib = float(kd_report[0][teacher]["size on disk (KiB)"])
    rows = [
        ("teacher (PyTorch eager)", kd[0]["teacher_params"], column(kd_report, teacher, "test accuracy (%)"), "—",
         f"{teacher_kib:.1f} KiB", "—", *timing(kd_report, teacher, agreement=False)),
        ("distilled student, float (ONNX)", kd[0]["student_params"], acc(kd_export, "test_accuracy_float"),
         "—", size(kd_export, "onnx"), *timing(kd_report, "student.onnx")),
        ("distilled student, int8 PTQ (`kd-export --int8`)", kd[0]["student_params"],
         acc(kd_export, "test_accuracy_int8"), acc(kd_export, "test_agreement"), size(kd_export, "onnx-int8"),
         *timing(kd_report, "student.int8.onnx")),
        (f"QAT-with-KD student (last {args.qat_epochs} epochs fake-quantized), float (ONNX)", qat[0]["student_params"],
         acc(qat_export, "test_accuracy_float"), "—", size(qat_export, "onnx"), *timing(qat_report, "student.onnx")),
        ("QAT-with-KD student, int8 (`kd-export --int8`)", qat[0]["student_params"],
         acc(qat_export, "test_accuracy_int8"), acc(qat_export, "test_agreement"), size(qat_export, "onnx-int8"),
         *timing(qat_report, "student.int8.onnx")),
    ]  # fmt: skip
    command = " ".join(
        [
            "python scripts/deploy_table.py",
            *([f"--preset {args.preset}"] if args.preset else []),
            "--seeds",
            *map(str, args.seeds),
            *([f"--qat-epochs {args.qat_epochs}"] if args.qat_epochs != 10 else []),
            *(["--", *args.overrides] if args.overrides else []),
        ]
    )
    lines = [
        f"## {args.preset or 'The default run'}",
        "",
        "<!-- written by scripts/deploy_table.py; do not edit by hand -->",
        f"Command: `{command}` ({provenance()})  ",
        f"Data: {data_description(cfg, args.preset)}, {student} student, {epochs} epochs of KD. "
        f"Seeds {', '.join(map(str, args.seeds))}; test accuracy in %, mean ± std over seeds, of the best-validation "
        "checkpoint (with QAT: the best of the fake-quantized epochs). int8: ONNX Runtime static quantization "
        "(QDQ, per-channel int8 weights, uint8 activations, MinMax ranges on "
        f"{entry(kd_export[0], 'onnx-int8')['calibration_batches']} training batches); 'agreement': "
        "top-1 agreement of the int8 model with its float checkpoint; 'agreement with teacher': top-1 agreement "
        "with the teacher over the test split (kd-report). Size: the ONNX file on disk (teacher: its safetensors "
        "state). Latency: kd-report's median of 50 calls after 10 on one CPU thread (ONNX Runtime for the files, "
        "PyTorch eager for the teacher), mean ± std over the seeds' runs.",
        "",
        "| model | parameters | test acc | agreement with float | size on disk | agreement with teacher "
        "| latency, batch 1 (ms) | latency, batch 64 (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {params:,} | {' | '.join(cells)} |" for name, params, *cells in rows]
    section = f"deploy-{args.preset or 'default'}"
    write_section(args.out, "\n".join(lines), section, title="# Deploying the student: float, int8 PTQ, QAT with KD")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
