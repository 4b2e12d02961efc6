"""kd-distill end to end vs the same work as a plain PyTorch loop: whole processes, wall clock.

    .venv/bin/python scripts/bench/e2e.py                  # --epochs 20 60 --threads 1 2 --repeats 3
    .venv/bin/python scripts/bench/e2e.py --epochs 1 2 --threads 1 --repeats 1 --no-write   # a quick check

Every number is the wall time of one process (``time.perf_counter`` around ``subprocess.run``):
  (A) ``kd-distill`` with the default recipe and a cached teacher: ``teacher_cache=disk compare_scratch=false
      logger=<--logger> data.batch_size=128 trainer.max_epochs=E runtime.cpu_threads=T``, a fresh
      ``hydra.run.dir`` per run;
  (B) ``scripts/bench/e2e_plain_loop.py``: the same models (built from the same Hydra configs), teacher
      weights (kd-distill's cached ones), data arrays, KD loss, AdamW and seed, batches of 128 shuffled,
      teacher training logits from a table, a validation pass every epoch, a test pass at the end; no
      Lightning; ``torch.set_num_threads(T)``.
One ``KD_LIGHTNING_HOME`` (a temporary directory, or ``--home``) is shared by every run; a warm-up run of
each program (untimed) trains and caches the teacher, generates MNIST-1D, fills kd-distill's teacher-output
tables and the plain loop's table. ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` are removed from the
programs' environment (unless ``--keep-omp-env``), so that ``cpu_threads``'s default means what it means
for a user who sets neither.

Rows: E epochs at T threads (median of ``--repeats`` pairs, A and B back to back in alternating order);
per-epoch cost = slope of time over E, start-up = intercept (least squares; two E: the two-point line);
``kd-distill --help`` and ``import kd_lightning.cli.distill`` (median of 3) against the plain loop's
``--help`` and ``import torch``; which of wandb, matplotlib, transformers, optuna are imported (by the
import, and by a whole run: the warm-up runs under ``PYTHONPROFILEIMPORTTIME``); contention: a
``--contention-epochs`` run at the default ``cpu_threads`` (no override), at 1 thread and at one thread per
usable core (torch's own default), idle and with a
busy process (``python -c "while True: pass"``) started before and killed after the pair. Each run is
checked (exit code; kd-distill's summary.json) and both programs' test accuracies are compared (last
epoch's weights: kd-distill's ``test/acc_last``); they should agree. Writes the ``--section`` of
docs/performance.md (unless ``--no-write``) and, with ``--json``, every raw timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_step import REPO, provenance, write_section

from kd_lightning.engine.checks import usable_cores

PLAIN = Path(__file__).resolve().with_name("e2e_plain_loop.py")
BATCH = 128
HEAVY = ("wandb", "matplotlib", "transformers", "optuna")
STARTUP_REPEATS = 3
HEADING = "## CPU: end to end, kd-distill vs a plain loop"
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass
class Setup:
    """What every run shares: the cache home, the programs' environment, the warm-up's findings, the raw runs."""

    home: Path
    env: dict[str, str]
    logger: str
    teacher_weights: Path | None = None
    table: Path | None = None
    default_setting: Any = None  # runtime.cpu_threads as the config has it
    default_threads: int | None = None  # what kd-distill made of it
    imports: dict[str, set[str]] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)

    def run_dir(self) -> Path:
        return self.home / "runs" / f"run_{len(list((self.home / 'runs').glob('run_*'))):04d}"


def kd_distill_program() -> str:
    beside = Path(sys.executable).with_name("kd-distill")
    return str(beside) if beside.is_file() else "kd-distill"


def run_timed(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Wall time of ``command`` as a process; a non-zero exit code is an error."""
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if out.returncode:
        stderr = "\n".join(line for line in out.stderr.splitlines() if not line.startswith("import time:"))
        raise RuntimeError(f"{shlex.join(command)} exited {out.returncode}:\n{stderr[-3000:]}")
    return seconds, out


def imported_packages(importtime_log: str) -> set[str]:
    """Top-level packages named by ``-X importtime`` lines."""
    lines = (line.split("|")[-1].strip() for line in importtime_log.splitlines() if line.startswith("import time:"))
    return {name.split(".")[0] for name in lines if name and name != "package"}


def profiled(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PYTHONPROFILEIMPORTTIME": "1"}


def common_overrides(epochs: int) -> list[str]:
    return [f"data.batch_size={BATCH}", f"trainer.max_epochs={epochs}"]


def kd_distill(setup: Setup, epochs: int, threads: int | None, env: dict[str, str] | None = None) -> dict[str, Any]:
    """One kd-distill run (``threads`` None: no cpu_threads override); its time and summary."""
    run_dir = setup.run_dir()
    command = [kd_distill_program(), "teacher_cache=disk", "compare_scratch=false", f"logger={setup.logger}"]
    command += common_overrides(epochs) + ([f"runtime.cpu_threads={threads}"] if threads else [])
    seconds, out = run_timed([*command, f"hydra.run.dir={run_dir}"], env or setup.env)
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"kd-distill exited 0 but wrote no {summary_file}:\n{out.stdout[-3000:]}")
    summary = json.loads(summary_file.read_text())
    metrics = summary["metrics"]
    return {
        "seconds": seconds,
        "test_acc": metrics["test/acc_last"],
        "test_acc_best_ckpt": metrics["test/acc"],
        "threads": summary.get("cpu_threads"),
        "summary": summary,
        "stderr": out.stderr,
    }


def plain_loop(
    setup: Setup, epochs: int, threads: int | None, env: dict[str, str] | None = None, prepare: bool = False
) -> dict[str, Any]:
    """One run of the plain loop (``threads`` None: the count kd-distill chose by default); time and accuracy."""
    threads = threads or setup.default_threads
    command = [sys.executable, str(PLAIN), "--teacher-weights", str(setup.teacher_weights), "--table", str(setup.table)]
    command += (["--prepare"] if prepare else []) + (["--threads", str(threads)] if threads else [])
    seconds, out = run_timed(command + common_overrides(epochs), env or setup.env)
    result = {} if prepare else json.loads(out.stdout.strip().splitlines()[-1])
    return {**result, "seconds": seconds, "stderr": out.stderr}


def warm_up(setup: Setup) -> None:
    """Untimed first runs: teacher trained and cached, data generated, both programs' tables filled; records
    the teacher weights, the default thread count and what a whole run of each program imports."""
    kd = kd_distill(setup, 1, None, profiled(setup.env))
    setup.teacher_weights = Path(kd["summary"]["teacher_source"].split()[-1])
    if not setup.teacher_weights.is_file():
        raise RuntimeError(f"no teacher weights at {setup.teacher_weights} (teacher_source of the warm-up run)")
    setup.default_setting = kd["summary"]["config"]["runtime"].get("cpu_threads")
    setup.default_threads = kd["threads"]
    setup.table = setup.home / "plain_loop" / "teacher_train_logits.npy"
    plain = plain_loop(setup, 1, None, profiled(setup.env), prepare=True)
    setup.imports = {"kd run": imported_packages(kd["stderr"]), "plain run": imported_packages(plain["stderr"])}
    print(
        f"warm-up: teacher {setup.teacher_weights}, default cpu_threads {setup.default_setting} -> "
        f"{setup.default_threads} threads, {kd['seconds']:.1f} s + {plain['seconds']:.1f} s",
        flush=True,
    )


@contextlib.contextmanager
def competitor() -> Iterator[None]:
    """A process spinning on one core for as long as the block runs."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    time.sleep(0.5)  # running before the first program starts
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def pair(setup: Setup, epochs: int, threads: int | None, repeat: int, busy: bool = False) -> None:
    """A(E) and B(E) back to back, kd-distill first on even repeats; recorded in ``setup.runs``."""
    programs = [("kd-distill", kd_distill), ("plain", plain_loop)]
    with competitor() if busy else contextlib.nullcontext():
        for name, program in programs if repeat % 2 == 0 else programs[::-1]:
            result = program(setup, epochs, threads)
            run = {"program": name, "epochs": epochs, "threads": threads, "busy": busy, "repeat": repeat}
            run |= {key: result.get(key) for key in ("seconds", "test_acc", "test_acc_best_ckpt")}
            run["used_threads"] = result.get("threads")
            setup.runs.append(run)
            print(
                f"{name:10} E={epochs} T={threads or 'default'}{' busy' if busy else ''} r={repeat}: "
                f"{run['seconds']:.2f} s, test acc {run['test_acc']:.4f} ({run['used_threads']} threads)",
                flush=True,
            )


def median(setup: Setup, program: str, key: str = "seconds", **where: Any) -> float:
    values = [
        run[key] for run in setup.runs if run["program"] == program and all(run[k] == v for k, v in where.items())
    ]
    return statistics.median(values)


def startup(setup: Setup) -> dict[str, Any]:
    """``--help`` and import wall times (median of 3) and the heavy packages an import pulls in."""
    python = sys.executable
    commands = {
        "help": ([kd_distill_program(), "--help"], [python, str(PLAIN), "--help"]),
        "import": ([python, "-c", "import kd_lightning.cli.distill"], [python, "-c", "import torch"]),
    }
    times = {
        name: [statistics.median(run_timed(c, setup.env)[0] for _ in range(STARTUP_REPEATS)) for c in programs]
        for name, programs in commands.items()
    }
    kd_imports = run_timed([python, "-X", "importtime", "-c", "import kd_lightning.cli.distill"], setup.env)[1]
    plain_imports = run_timed([python, "-X", "importtime", str(PLAIN), "--help"], setup.env)[1]
    setup.imports |= {"kd import": imported_packages(kd_imports.stderr)}
    setup.imports |= {"plain import": imported_packages(plain_imports.stderr)}
    return times


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def threads_label(setup: Setup, threads: int | None) -> str:
    if threads is None:
        return f"default cpu_threads ({setup.default_setting} → {setup.default_threads})"
    return plural(threads, "thread")


def row(setting: str, a: float, b: float, digits: int = 2) -> str:
    return f"| {setting} | {a:.{digits}f} | {b:.{digits}f} | {a / b:.2f} |"


def epoch_rows(setup: Setup, epochs: list[int], threads: int) -> list[str]:
    """E-epoch medians, then per-epoch slope and start-up intercept, at ``threads``."""
    label = threads_label(setup, threads)
    medians = {
        p: [median(setup, p, epochs=e, threads=threads, busy=False) for e in epochs] for p in ("kd-distill", "plain")
    }
    pairs = zip(epochs, medians["kd-distill"], medians["plain"], strict=True)
    lines = [row(f"{plural(e, 'epoch')}, {label}", a, b) for e, a, b in pairs]
    if len(epochs) > 1:
        fits = {p: statistics.linear_regression(epochs, times) for p, times in medians.items()}
        span = f"{epochs[0]}–{epochs[-1]} epochs"
        lines.append(row(f"per epoch, {label} (slope, {span})", fits["kd-distill"][0], fits["plain"][0], 3))
        lines.append(row(f"start-up, {label} (intercept)", fits["kd-distill"][1], fits["plain"][1]))
    return lines


def heavy(packages: set[str]) -> str:
    return " / ".join("yes" if name in packages else "no" for name in HEAVY)


def contention_threads() -> tuple[int | None, ...]:
    """The default (``cpu_threads=auto``), 1 thread, and every usable core (torch's own default)."""
    return (None, 1, usable_cores())


def contention_rows(setup: Setup, epochs: int) -> list[str]:
    lines = []
    for threads in contention_threads():
        for busy in (False, True):
            a, b = (median(setup, p, epochs=epochs, threads=threads, busy=busy) for p in ("kd-distill", "plain"))
            what = "1 busy process" if busy else "idle"
            lines.append(row(f"{plural(epochs, 'epoch')}, {threads_label(setup, threads)}, {what}", a, b))
    return lines


def accuracy_note(setup: Setup, epochs: int, max_gap: float) -> str:
    """Both programs' test accuracy at ``epochs`` (median over runs) and the largest gap of any pair."""
    kd, plain = (median(setup, p, "test_acc", epochs=epochs, busy=False) for p in ("kd-distill", "plain"))
    best = median(setup, "kd-distill", "test_acc_best_ckpt", epochs=epochs, busy=False)
    gaps = [
        abs(a["test_acc"] - b["test_acc"])
        for a in setup.runs
        for b in setup.runs
        if a["program"] == "kd-distill"
        and b["program"] == "plain"
        and all(a[k] == b[k] for k in ("epochs", "threads", "busy", "repeat"))
    ]
    note = (
        f"Test accuracy after {plural(epochs, 'epoch')}: kd-distill {100 * kd:.2f}% (last epoch; "
        f"{100 * best:.2f}% at its best-validation checkpoint), plain loop {100 * plain:.2f}% (last epoch); "
        f"largest gap between the two programs of a pair, any setting: {100 * max(gaps):.2f} points"
    )
    if max(gaps) > max_gap:
        note += f" (more than --max-acc-gap {100 * max_gap:g}: the plain loop does different work)"
        print(f"WARNING: {note}", file=sys.stderr)
    return note + "."


def command_line(args: argparse.Namespace) -> str:
    parts = ["python scripts/bench/e2e.py", "--epochs", *map(str, args.epochs), "--threads", *map(str, args.threads)]
    parts += ["--repeats", str(args.repeats)]
    if args.contention_epochs != 2:
        parts += ["--contention-epochs", str(args.contention_epochs)]
    if args.logger != "csv":
        parts += ["--logger", args.logger]
    if args.keep_omp_env:
        parts.append("--keep-omp-env")
    if args.section != "kd-e2e":
        parts += ["--section", args.section]
    return " ".join(parts)


def machine_line(load_before: float, removed: list[str]) -> str:
    cpu = platform.processor() or platform.machine()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = f"; {', '.join(removed)} removed from the programs' environment" if removed else ""
    return (
        f"{cpu}, {os.cpu_count()} cores ({usable} usable), torch {torch.__version__}, Python "
        f"{platform.python_version()}; load average (1 min) {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after{env}"
    )


def description(args: argparse.Namespace) -> str:
    kd = f"teacher_cache=disk compare_scratch=false logger={args.logger} data.batch_size={BATCH}"
    return (
        "Wall time of whole processes in s (`time.perf_counter` around `subprocess.run`), median of "
        f"{plural(args.repeats, 'pair')} run back to back in alternating order; kd-distill: `{kd}`, teacher, data "
        "and teacher-output tables cached by an untimed warm-up; plain loop: `scripts/bench/e2e_plain_loop.py` "
        "(same models, teacher weights, data, KD loss, AdamW, seed; no Lightning). Per epoch = slope of time over "
        'epochs, start-up = its intercept; busy process = `python -c "while True: pass"`; ratio = kd-distill / plain.'
    )


def table(args: argparse.Namespace, setup: Setup, times: dict[str, Any], machine: str) -> str:
    lines: list[str] = []
    for threads in args.threads:
        lines += epoch_rows(setup, sorted(args.epochs), threads)
    help_a, help_b = times["help"]
    import_a, import_b = times["import"]
    lines += [
        row("`kd-distill --help` (plain: `e2e_plain_loop.py --help`)", help_a, help_b),
        row("`import kd_lightning.cli.distill` (plain: `import torch`)", import_a, import_b),
        f"| heavy imports by the import: {' / '.join(HEAVY)} | {heavy(setup.imports['kd import'])} "
        f"| {heavy(setup.imports['plain import'])} | — |",
        f"| heavy imports by a whole run (warm-up): {' / '.join(HEAVY)} | {heavy(setup.imports['kd run'])} "
        f"| {heavy(setup.imports['plain run'])} | — |",
    ]
    if args.contention_epochs:
        lines += contention_rows(setup, args.contention_epochs)
    return "\n".join(
        [
            "<!-- kd-e2e table: written by scripts/bench/e2e.py -->",
            f"Command: `{command_line(args)}` ({provenance()})  ",
            f"Machine: {machine}. {description(args)}",
            "",
            "| setting | kd-distill s | plain loop s | ratio |",
            "|---|---|---|---|",
            *lines,
            "",
            accuracy_note(setup, max(args.epochs), args.max_acc_gap),
        ]
    )


def write_table(path: Path, text: str, section: str) -> None:
    """``text`` as ``section`` of ``path``; a new section is appended under :data:`HEADING`."""
    if f"<!-- {section}:begin -->" not in (path.read_text() if path.is_file() else ""):
        with path.open("a") as doc:
            doc.write(f"\n{HEADING}\n")
    write_section(path, text, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 60])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--contention-epochs", type=int, default=2, help="epochs of the contention runs (0: none)")
    parser.add_argument("--logger", default="csv", help="kd-distill's logger group (csv: conf/distill.yaml's default)")
    parser.add_argument("--keep-omp-env", action="store_true", help="keep OMP_NUM_THREADS/MKL_NUM_THREADS for them")
    parser.add_argument("--max-acc-gap", type=float, default=0.01, help="largest test-accuracy gap of a pair")
    parser.add_argument("--home", type=Path, help="KD_LIGHTNING_HOME of every run (default: a temporary dir)")
    parser.add_argument("--section", default="kd-e2e", help="marker name of the table in --out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "performance.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--json", type=Path, help="write every raw timing here")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    removed = [] if args.keep_omp_env else [name for name in THREAD_ENV if name in os.environ]
    with tempfile.TemporaryDirectory(prefix="kd-e2e-") as tmp:
        home = (args.home or Path(tmp)).resolve()
        env = {k: v for k, v in os.environ.items() if k not in removed} | {"KD_LIGHTNING_HOME": str(home)}
        setup = Setup(home, env, args.logger)
        warm_up(setup)
        for repeat in range(args.repeats):
            for threads in args.threads:
                for epochs in sorted(args.epochs):
                    pair(setup, epochs, threads, repeat)
            for threads in contention_threads() if args.contention_epochs else ():
                for busy in (False, True):
                    pair(setup, args.contention_epochs, threads, repeat, busy)
        times = startup(setup)
    machine = machine_line(load_before, removed)
    text = table(args, setup, times, machine)
    print(text)
    if args.json:
        raw = {"command": command_line(args), "machine": machine, "startup": times, "runs": setup.runs}
        raw |= {"imports": {k: sorted(v) for k, v in setup.imports.items()}, "default_threads": setup.default_threads}
        args.json.write_text(json.dumps(raw, indent=2))
    if not args.no_write:
        write_table(args.out, text, args.section)


if __name__ == "__main__":
    main()
