"""Reproduce the README table: the default distillation vs the same student from scratch, over seeds.

    python scripts/kd_vs_scratch.py                       # seeds 0 1 2, writes docs/results/default.md
    python scripts/kd_vs_scratch.py --seeds 0 1 2 3 4 -- loss.temperature=2

Runs, in a fresh KD_LIGHTNING_HOME (so every teacher is trained and timed):
1. ``kd-distill -m seed=...``: the default; each job also trains its scratch baseline (method=supervised, same
   epochs, seed and optimizer, labelled samples only);
2. ``kd-distill -m seed=... method=supervised trainer.max_epochs=<factor x epochs>``: a scratch student with
   at least as many optimizer steps as the distilled one;
3. ``kd-distill -m seed=... data.transfer_samples=0``: plain KD on the labelled samples only.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from multirun import mean_std, provenance, run_seeds

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "default.md"


def sweep(seeds: list[int], overrides: list[str], sweep_dir: Path) -> list[dict]:
    """One Hydra multirun over ``seeds`` in a fresh cache beside ``sweep_dir`` (teachers retrained and timed)."""
    return run_seeds(overrides, seeds, sweep_dir, sweep_dir.parent / "home")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--long-scratch-factor",
        type=int,
        default=6,
        help="epochs multiplier of the longer scratch run (6 = as many steps as KD with the "
        "20,000-sample transfer set on 4,000 labelled samples)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the README is updated only for the default")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        kd = sweep(args.seeds, args.overrides, Path(tmp) / "kd")
        epochs = kd[0]["config"]["trainer"]["max_epochs"]
        long_scratch = sweep(
            args.seeds,
            [*args.overrides, "method=supervised", f"trainer.max_epochs={epochs * args.long_scratch_factor}"],
            Path(tmp) / "scratch_long",
        )
        labelled_only = sweep(
            args.seeds,
            [*args.overrides, "data.transfer_samples=0", "compare_scratch=false"],
            Path(tmp) / "kd_labelled_only",
        )

    def col(runs: list[dict], key: str) -> list[float]:
        return [run["metrics"][key] for run in runs]

    cfg = kd[0]["config"]
    rows = [
        ("teacher (1-D CNN)", kd[0]["teacher_params"], col(kd, "teacher/test_acc"), None, "—"),
        (
            f"student from scratch, {epochs} epochs",
            kd[0]["student_params"],
            [run["scratch"]["test_acc"] for run in kd],
            None,
            "—",
        ),
        (
            f"student from scratch, {epochs * args.long_scratch_factor} epochs",
            kd[0]["student_params"],
            col(long_scratch, "test/acc"),
            col(long_scratch, "test/acc_last"),
            "—",
        ),
        (
            f"student distilled (KD, T={cfg['loss']['temperature']}, alpha={cfg['loss']['alpha']}), {epochs} epochs",
            kd[0]["student_params"],
            col(kd, "test/acc"),
            col(kd, "test/acc_last"),
            mean_std([r["kd_gain"] for r in kd]),
        ),
        (
            f"student distilled on the labelled samples only (no transfer set), {epochs} epochs",
            kd[0]["student_params"],
            col(labelled_only, "test/acc"),
            col(labelled_only, "test/acc_last"),
            mean_std([a - b["scratch"]["test_acc"] for a, b in zip(col(labelled_only, "test/acc"), kd, strict=True)]),
        ),
    ]
    command = " ".join(
        [
            "python scripts/kd_vs_scratch.py",
            "--seeds",
            *map(str, args.seeds),
            *(["--", *args.overrides] if args.overrides else []),
        ]
    )
    lines = [
        "<!-- written by scripts/kd_vs_scratch.py; do not edit by hand -->",
        f"Command: `{command}` ({provenance()})  ",
        f"Data: MNIST-1D, 4,000 labelled training samples + {cfg['data']['transfer_samples']:,} unlabelled "
        "transfer samples (distillation only), 1,000 validation, official 1,000 test. "
        f"Seeds {', '.join(map(str, args.seeds))}; test accuracy in %, mean ± std over seeds; "
        "'best' = checkpoint with the best validation accuracy, 'last' = final epoch.",
        "",
        "| model | parameters | test acc (best) | test acc (last) | gain over scratch (same epochs) |",
        "|---|---|---|---|---|",
    ]
    for name, params, best, last, gain in rows:
        lines.append(f"| {name} | {params:,} | {mean_std(best)} | {mean_std(last) if last else '—'} | {gain} |")
    seconds = [run["seconds"]["total"] for run in kd]
    lines += [
        "",
        f"Wall time of one default run (teacher fit + distillation + scratch baseline, 2 CPU cores): "
        f"{statistics.mean(seconds):.0f} ± {statistics.stdev(seconds) if len(seconds) > 1 else 0:.0f} s.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.out == DEFAULT_OUT:
        update_readme("\n".join(lines[1:]))


def update_readme(table: str) -> None:
    """Replace the README's results block (between the results markers) with ``table``."""
    readme = REPO / "README.md"
    text = readme.read_text()
    begin, end = "<!-- results:begin -->\n", "<!-- results:end -->"
    head, rest = text.split(begin, 1)
    readme.write_text(head + begin + table + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    main()
