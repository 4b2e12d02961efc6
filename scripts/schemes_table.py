"""Run every training scheme (conf/method) against plain KD on the embedded default (MNIST-1D); write a table.

    python scripts/schemes_table.py                                   # every scheme, seeds 0-4, 40 epochs
    python scripts/schemes_table.py --schemes kd mutual --seeds 0 --epochs 2 --out /tmp/s.md

Each scheme is one Hydra multirun over the seeds (``kd-distill -m seed=... experiment=mnist1d_kd_40ep
<scheme overrides>``) in one KD_LIGHTNING_HOME shared by all schemes, so each seed's teacher and scratch
student are trained once and reused (``kd`` runs first and trains them). Every scheme trains the same
4,810-parameter MLP student for ``--epochs`` epochs per stage (a multi-stage scheme runs several stages;
its wall time counts all of them). Reported: test accuracy of the best-validation and of the last
checkpoint, the scratch student, the gain over it, the student-side training wall time per run (every
stage's fit, without the amortised teacher fit and the scratch baseline) and the peak resident memory of
the multirun process. Writes ``docs/results/schemes.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script's formatting, also when loaded by path
from multirun import mean_std as fmt
from multirun import provenance

REPO = Path(__file__).resolve().parents[1]
KD_DISTILL = Path(sys.executable).parent / "kd-distill"
BASE = ["experiment=mnist1d_kd_40ep"]

#: Schemes run on the first MAX_SEEDS[scheme] seeds only (the slow ones).
MAX_SEEDS = {"data_free": 3}
#: Scheme -> (overrides on top of BASE, what it is).
SCHEMES: dict[str, tuple[list[str], str]] = {
    "kd": ([], "Hinton KD from the 1-D CNN teacher (T = 4, alpha = 0.9)"),
    "multi_teacher": (["method=multi_teacher"], "two CNN teachers (64 and 32 channels), mean of probabilities"),
    "multi_teacher_confidence": (
        ["method=multi_teacher", "method.combine=confidence"],
        "the same two teachers, per-sample CA-MKD confidence weights",
    ),
    "mutual": (
        ["method=mutual", "loss.alpha=0.5", "loss.temperature=1"],
        "deep mutual learning, student + one MLP peer, no teacher (the paper's CE 1 : KL 1 at T = 1)",
    ),
    "born_again": (["method=born_again"], "3 generations of the MLP, generation 0 = the scratch student"),
    "assistant_chain": (["method=assistant_chain"], "teacher -> 16-channel CNN assistant (9,098) -> student"),
    "kd_bn_teacher": (["teacher=cnn1d_bn"], "plain KD from the BatchNorm CNN teacher (data_free's teacher)"),
    "data_free": (
        ["method=data_free", "teacher=cnn1d_bn"],
        "generator-based data-free KD from the BatchNorm teacher: no training input read; the slowest scheme "
        "(see its time), so it runs the first 3 seeds only",
    ),
    "function_matching": (
        ["experiment=mnist1d_function_matching"],
        "KD alone (alpha = 1, T = 1) on identical augmented + mixup views, cosine schedule",
    ),
}


def run_scheme(name: str, seeds: list[int], epochs: int, root: Path, extra: list[str]) -> tuple[list[dict], int]:
    """The scheme's summaries (one per seed) and the multirun's peak resident memory (KiB); reused when a
    previous invocation with the same root finished it."""
    sweep_dir = root / "runs" / name
    record = sweep_dir / "peak_rss_kib"
    done = sorted(sweep_dir.glob("*/summary.json"))
    if len(done) == len(seeds) and record.is_file():
        return [json.loads(p.read_text()) for p in done], int(record.read_text())
    overrides, _ = SCHEMES[name]
    command = [
        str(KD_DISTILL),
        "-m",
        f"seed={','.join(map(str, seeds))}",
        *BASE,
        *overrides,
        f"trainer.max_epochs={epochs}",
        f"hydra.sweep.dir={sweep_dir}",
        "+trainer.enable_progress_bar=false",
        *extra,
    ]
    print("$ kd-distill", " ".join(command[1:]), flush=True)
    env = {**os.environ, "KD_LIGHTNING_HOME": str(root / "home"), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, env=env)
    loads = []  # the machine's 1-minute load average while the scheme ran (2 cores: ~1 is this job alone)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)  # this child's own peak RSS, not all children's
        if pid:
            break
        loads.append(os.getloadavg()[0])
        time.sleep(5)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: kd-distill exited with {os.waitstatus_to_exitcode(status)}")
    (sweep_dir / "load_average").write_text(f"{statistics.mean(loads or [os.getloadavg()[0]]):.2f}")
    record.write_text(str(usage.ru_maxrss))
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/summary.json"))], usage.ru_maxrss


def training_seconds(summary: dict, run_dir: Path) -> float:
    """Student-side training wall time: the fit of every stage (a multi-stage run), else the run's fit."""
    if summary.get("stages"):
        stages = [json.loads((run_dir / "stages" / s["stage"] / "summary.json").read_text()) for s in summary["stages"]]
        return sum(stage["seconds"]["distill"] for stage in stages)
    return summary["seconds"]["distill"]


def table_row(name: str, runs: list[dict], run_dirs: list[Path], peak_kib: int) -> str:
    test = [r["metrics"]["test/acc"] for r in runs]
    last = [r["metrics"]["test/acc_last"] for r in runs]
    scratch = [r["scratch"]["test_acc"] for r in runs]
    gain = [a - s for a, s in zip(test, scratch, strict=True)]
    seconds = [training_seconds(r, d) for r, d in zip(runs, run_dirs, strict=True)]
    extra = ""
    if "test/acc_ensemble" in runs[0]["metrics"]:
        extra = f" (ensemble of generations: {fmt([r['metrics']['test/acc_ensemble'] for r in runs])})"
    cells = [
        name,
        fmt(test) + extra,
        fmt(last),
        fmt(scratch),
        fmt(gain),
        fmt(seconds, scale=1.0),
        (run_dirs[0].parent / "load_average").read_text(),
        f"{peak_kib / 1024:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=list(SCHEMES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "schemes.md")
    parser.add_argument(
        "--root", type=Path, default=None, help="keep runs here; rerunning with it reuses finished schemes"
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()

    rows, teacher = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for name in args.schemes:
            seeds = args.seeds[: MAX_SEEDS.get(name, len(args.seeds))]
            runs, peak = run_scheme(name, seeds, args.epochs, root, args.overrides)
            run_dirs = sorted(p.parent for p in (root / "runs" / name).glob("*/summary.json"))
            rows.append(table_row(name, runs, run_dirs, peak))
            print(rows[-1], flush=True)
            if name == "kd":
                teacher = {r["config"]["seed"]: r["metrics"]["teacher/test_acc"] for r in runs}

    command = " ".join(
        [
            "python scripts/schemes_table.py",
            "--schemes",
            *args.schemes,
            "--seeds",
            *map(str, args.seeds),
            "--epochs",
            str(args.epochs),
            *(["--", *args.overrides] if args.overrides else []),
        ]
    )
    described = "; ".join(
        f"`{name}`: {SCHEMES[name][1]} (`{' '.join(SCHEMES[name][0]) or 'defaults'}`)" for name in args.schemes
    )
    lines = [
        "<!-- written by scripts/schemes_table.py; do not edit by hand -->",
        f"Command: `{command}` ({provenance()})  ",
        f"MNIST-1D default data (4,000 labelled + 20,000 unlabelled transfer samples), student: the MLP "
        f"(4,810 parameters), {args.epochs} epochs per stage, AdamW lr 0.003, batch 128, seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± std over the distinct seeds"
        + (f"; the default 1-D CNN teacher's test acc {fmt(list(teacher.values()))} %" if teacher else "")
        + ". Every scheme starts from `experiment=mnist1d_kd_40ep` and adds its overrides: "
        + described
        + ". Scratch = the same student trained supervised on the labelled samples, same epochs and seed. "
        "Time = student-side training wall time per run, every stage's fit (validation included), on 2 CPU "
        "cores with one torch thread; load average = the machine's mean 1-minute load while the scheme ran (about "
        "1 is the scheme alone; more means other work shared the 2 cores and inflated the time). Peak memory = "
        "the largest resident set of the multirun process.",
        "",
        "| scheme | test acc (best val) | test acc (last) | scratch | gain (points) | train time (s) "
        "| load average | peak memory (MiB) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
