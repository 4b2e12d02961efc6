"""The CIFAR-100 benchmark protocol over seeds, beside the published numbers (../shared/BENCHMARKS.md).

    python scripts/cifar100_protocol.py --data-root ~/data --seeds 0 1 2                    # every method, every pair
    python scripts/cifar100_protocol.py --data-root ~/data --methods kd dkd_wrn --seeds 0 1 2
    python scripts/cifar100_protocol.py --data-root /tmp/fake --methods kd --seeds 0 --epochs 1 --out /tmp/t.md

Each method is one ``kd-distill -m experiment=cifar100_<method> seed=...`` multirun (conf/experiment/cifar100_*.yaml:
240 epochs of SGD, the published hyper-parameters of each method; the teacher trained first with the same recipe
and shared by every method of a seed through one KD_LIGHTNING_HOME, as is the student trained alone). As the
papers do, the epoch is selected on the test set: "best" is the best epoch's test accuracy, "last" the last
epoch's; both are reported, mean ± std over the seeds, beside the published best-epoch numbers.
Needs the data (``<data-root>/cifar-100-python/``) and, for 240 epochs, a GPU: about 2-4 h per run on one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multirun import mean_std, provenance, run_seeds

REPO = Path(__file__).resolve().parents[1]

#: Published CIFAR-100 top-1 (%, best epoch) of each preset, from ../shared/BENCHMARKS.md and, for the newer
#: methods, the sources named below (None: not published).
PUBLISHED: dict[str, float | None] = {
    "kd": 73.33,
    "dkd": 76.32,
    "dist": 76.31,
    "crd": 75.51,
    "reviewkd": 75.63,
    "kd_ls": 76.62,
    "kd_wrn": 74.92,
    "dkd_wrn": 76.23,
    "dist_wrn": None,
    "crd_wrn": 75.48,
    "reviewkd_wrn": None,
    "kd_ls_wrn": 76.11,
    # Newer methods: the authors' README tables (each preset's header names its source; None: no number there).
    "nkd": None,
    "ctkd": None,
    "ctkd_wrn": 75.45,  # zhengli97/CTKD README
    "sdd": None,
    "wkd_l": 76.53,  # JiamingLv/WKD README
    "wkd_f": 76.77,  # JiamingLv/WKD README
    "ickd": 75.25,  # ADLab-AutoDrive/ICKD Cifar100/README.md, ICKD-C w/o KL
    "ickd_wrn": 75.64,  # ditto
    "srd": None,
    "ofd_wrn": None,
    "catkd": None,
    "catkd_wrn": None,
    "ft": 72.86,  # HobbitLong/RepDistiller README
    "ft_wrn": 73.25,  # ditto
    # MLKD: the authors' repository has no table; the MLKD row quoted in sunshangquan/logit-standardization-KD's
    # README (trained with MLKD's second, RandAugment view, which these presets leave out).
    "mlkd": 77.08,
    "mlkd_wrn": 76.63,
    "mlkd_vgg": 75.18,
}
#: Published teacher / student-alone accuracy of each pair.
PAIRS = {
    "resnet32x4 -> resnet8x4": (79.42, 72.50),
    "wrn_40_2 -> wrn_16_2": (75.61, 73.26),
    "vgg13 -> vgg8": (74.64, 70.36),  # HobbitLong/RepDistiller README
}
#: The pair of a preset named ``cifar100_<method><suffix>``; no suffix: resnet32x4 -> resnet8x4.
PAIR_SUFFIXES = {"_wrn": "wrn_40_2 -> wrn_16_2", "_vgg": "vgg13 -> vgg8"}


def pair_of(method: str) -> str:
    return next((pair for suffix, pair in PAIR_SUFFIXES.items() if method.endswith(suffix)), "resnet32x4 -> resnet8x4")


def run_method(method: str, seeds: list[int], root: Path, extra: list[str]) -> list[dict]:
    """One multirun of the method's preset over ``seeds`` (finished jobs of an earlier call with ``--root`` reused)."""
    return run_seeds([f"experiment=cifar100_{method}", *extra], seeds, root / "runs" / method, root / "home")


def row(method: str, runs: list[dict]) -> str:
    best = [r["metrics"]["val/acc_best"] for r in runs]  # validation is the test set (data.val_samples=0)
    last = [r["metrics"]["test/acc_last"] for r in runs]
    teacher = [r["metrics"]["teacher/test_acc"] for r in runs]
    alone = [r["scratch"]["val_acc_best"] for r in runs if r.get("scratch")]
    published = PUBLISHED.get(method)
    cells = [
        method,
        pair_of(method),
        mean_std(best),
        mean_std(last),
        f"{published:.2f}" if published is not None else "—",
        mean_std(teacher),
        mean_std(alone) if alone else "—",
        str(len(runs)),
    ]
    return "| " + " | ".join(cells) + " |"


def table(results: dict[str, list[dict]], command: str) -> str:
    epochs = {r["config"]["trainer"]["max_epochs"] for runs in results.values() for r in runs}
    lines = [
        "# CIFAR-100, the standard KD protocol",
        "",
        f"Command: `{command}` ({provenance()})",
        "",
        f"Top-1 %, mean ± std over seeds; {', '.join(map(str, sorted(epochs)))} epochs. Best: the best epoch's test "
        "accuracy (the published protocol selects the epoch on test); last: the last epoch's. Published: "
        "../shared/BENCHMARKS.md (best epoch). Teacher / student alone published: "
        + "; ".join(f"{pair} {t:.2f} / {s:.2f}" for pair, (t, s) in PAIRS.items())
        + ".",
        "",
        "| method | pair | best | last | published | teacher | student alone (best) | seeds |",
        "|---|---|---|---|---|---|---|---|",
        *(row(method, runs) for method, runs in results.items()),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(PUBLISHED), choices=list(PUBLISHED))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", required=True, help="directory holding cifar-100-python/")
    parser.add_argument("--epochs", type=int, default=None, help="override the protocol's 240 (e.g. a smoke run)")
    parser.add_argument("--root", type=Path, default=REPO / "outputs" / "cifar100_protocol", help="runs and cache")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "cifar100.md")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    extra = [f"data.root={args.data_root}", *args.extra]
    if args.epochs is not None:
        extra += [f"trainer.max_epochs={args.epochs}", f"teacher.fit.max_epochs={args.epochs}"]
    results = {method: run_method(method, args.seeds, args.root, extra) for method in args.methods}
    command = (
        f"python scripts/cifar100_protocol.py --data-root <dir> --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}"
        + (f" --epochs {args.epochs}" if args.epochs is not None else "")
        + (f" -- {' '.join(args.extra)}" if args.extra else "")
    )
    text = table(results, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
