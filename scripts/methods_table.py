"""Run every distillation method on the embedded default (MNIST-1D) over seeds; write a table and chart.

    python scripts/methods_table.py                          # all methods, seeds 0 1 2, 40 epochs
    python scripts/methods_table.py --methods kd dkd --seeds 0 --epochs 2 --out /tmp/t.md

For each method, one Hydra multirun over the seeds (``kd-distill -m seed=... loss=<method> ...``) in a
fresh KD_LIGHTNING_HOME shared by all methods, so each seed's teacher is trained once and reused.
Every job also trains (or reuses) its scratch student (method=supervised, same student, epochs, optimizer and
seed), which gives the gain and the fraction of the teacher-student gap recovered:
``(acc - scratch) / (teacher - scratch)``. Writes ``docs/results/methods.md`` and ``methods.png``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from multirun import mean_std as percent
from multirun import provenance, run_seeds

from kd_lightning.reporting.markdown import write_section

REPO = Path(__file__).resolve().parents[1]
KD_DISTILL = Path(sys.executable).parent / "kd-distill"

#: Per-method overrides: feature methods need a conv student (1-D feature maps like the teacher's).
METHODS: dict[str, list[str]] = {
    "kd": [],
    "kd_ls": ["loss=kd", "loss.terms.kd.standardize=true", "loss.temperature=2"],
    "dkd": [],
    "dist": [],
    "rkd": [],
    "sp": [],
    "pkt": [],
    "cc": [],
    "fitnet": ["student=cnn1d_narrow"],
    "at": ["student=cnn1d_narrow"],
    "vid": ["student=cnn1d_narrow"],
    # CRD's memory-bank gathers cost ~40 s per epoch on 2 CPU cores at its default 4096 negatives.
    "crd": ["loss.terms.crd.nce_k=512"],
    "reviewkd": ["student=cnn1d_narrow"],
    "ctkd": [],
    "nkd": [],
    "wttm": [],
    "mlkd": [],
    "wkd_l": [],
    "ofd": ["student=cnn1d_narrow"],
    "ickd": ["student=cnn1d_narrow"],
    "nst": ["student=cnn1d_narrow"],
    "srd": ["student=cnn1d_narrow"],
    "catkd": ["student=cnn1d_narrow"],
    "ft": ["student=cnn1d_narrow"],
    "wkd_f": ["student=cnn1d_narrow"],
}


def run_method(method: str, seeds: list[int], epochs: int, root: Path, extra: list[str]) -> list[dict]:
    own_loss = any(override.startswith("loss=") for override in METHODS[method])
    overrides = METHODS[method] if own_loss else [f"loss={method}", *METHODS[method]]
    return run_seeds([f"trainer.max_epochs={epochs}", *overrides, *extra], seeds, root / "runs" / method, root / "home")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table_row(method: str, runs: list[dict], epochs: int) -> tuple[str, dict]:
    test = [r["metrics"]["test/acc"] for r in runs]
    scratch = [r["scratch"]["test_acc"] for r in runs]
    teacher = [r["metrics"]["teacher/test_acc"] for r in runs]
    gain = [a - s for a, s in zip(test, scratch, strict=True)]
    recovered = [(a - s) / (t - s) for a, s, t in zip(test, scratch, teacher, strict=True)]
    seconds = [r["seconds"]["distill"] / epochs for r in runs]
    student = runs[0]["config"]["student"]["model"]["_target_"].rsplit(".", 1)[-1]
    last = [r["metrics"]["test/acc_last"] for r in runs]
    params = f"{student} ({runs[0]['student_params']:,})"
    mean_seconds = f"{statistics.mean(seconds):.2f}"
    cells = [
        method,
        params,
        percent(test),
        percent(last),
        percent(scratch),
        percent(gain),
        percent(recovered),
        mean_seconds,
    ]
    return "| " + " | ".join(cells) + " |", {"method": method, "gain": mean_std([100 * g for g in gain])}


def bar_chart(points: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [p["method"] for p in points]
    ax.bar(names, [p["gain"][0] for p in points], yerr=[p["gain"][1] for p in points], capsize=3, color="tab:blue")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("test acc gain over scratch student (points)")
    ax.set_title(title)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "methods.md")
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="keep runs here (default: a temporary directory); rerunning with the same --root "
        "reuses methods that finished, so an interrupted table resumes",
    )
    parser.add_argument(
        "--conditions",
        help="how the runs were timed, when not by this invocation (e.g. runs reused from --root, made while other "
        "jobs ran): replaces the load-average statement",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rows, points = [], []
    teacher: dict[int, float] = {}  # one value per seed: every method distils the same cached teacher
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        for method in args.methods:
            runs = run_method(method, args.seeds, args.epochs, root, args.overrides)
            row, point = table_row(method, runs, args.epochs)
            rows.append(row)
            points.append(point)
            print(row, flush=True)
            teacher |= {r["config"]["seed"]: r["metrics"]["teacher/test_acc"] for r in runs}
            config, teacher_params = runs[0]["config"], runs[0]["teacher_params"]

    command = " ".join(
        [
            "python scripts/methods_table.py",
            "--methods",
            *args.methods,
            "--seeds",
            *map(str, args.seeds),
            "--epochs",
            str(args.epochs),
            *([f'--conditions "{args.conditions}"'] if args.conditions else []),
            *(["--", *args.overrides] if args.overrides else []),
        ]
    )
    chart = args.out.with_suffix(".png")
    lines = [
        "<!-- written by scripts/methods_table.py; do not edit by hand -->",
        f"Command: `{command}` ({provenance()})  ",
        f"MNIST-1D default data (4,000 labelled + {config['data']['transfer_samples']:,} unlabelled transfer "
        f"samples), teacher: 1-D CNN ({teacher_params:,} parameters, test acc {percent(list(teacher.values()))} %), "
        f"{args.epochs} epochs, AdamW lr {config['optimizer']['lr']}, batch {config['data']['batch_size']}, "
        f"seeds {', '.join(map(str, args.seeds))}; mean ± std over seeds. Each method as configured in "
        "`conf/loss/<method>.yaml` (its task/distillation weights and layers); `kd_ls` = KD with logit "
        "standardization (T = 2). Scratch = the same student trained supervised (method=supervised) on the "
        "labelled samples, same epochs and seed. Gap recovered = (acc - scratch) / (teacher - scratch). "
        "Time = distillation wall time per epoch (validation included; FT's includes its paraphraser stage), "
        + (
            args.conditions
            or f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, 2 CPU cores, load average (1 min) "
            f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
        )
        + ". Not in this table: SDD (it pools regions of the "
        "last feature map into the classifier, which needs a head on pooled features; the MNIST-1D models' heads "
        "read the flattened map). Per-method overrides: "
        + "; ".join(f"{m}: `{' '.join(METHODS[m])}`" for m in args.methods if METHODS[m])
        + ".",
        "",
        "| method | student (params) | test acc (best val) | test acc (last) | scratch | gain (points) "
        "| gap recovered (%) | s / epoch |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"![gain over scratch per method]({chart.name})",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, "\n".join(lines), "methods-table", title="# Methods on the default data")
    bar_chart(points, chart, f"MNIST-1D, {args.epochs} epochs, {len(args.seeds)} seeds")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
