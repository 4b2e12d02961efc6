"""A preset's distilled student against the same student trained alone, over seeds.

    python scripts/kd_gain.py --preset digits_resnet18_mobilenetv2 --seeds 0 1 2 --out docs/results/digits.md
    python scripts/kd_gain.py --preset text_sentiment_bert --seeds 0 1 2 --out docs/results/text.md -- data.root=...

One ``kd-distill -m experiment=<preset> seed=...`` multirun (each job also trains the scratch student,
``compare_scratch``: method=supervised, same student, data, epochs, optimizer and seed). The table gives teacher,
distilled and scratch test accuracy (best-validation checkpoints) and the gain, paired per seed, mean ± std.
With an unlabelled transfer set the distilled student takes more steps per epoch than the scratch one (which
sees the labelled rows only): ``--long-scratch-factor F`` adds a scratch student trained F times as many epochs
(F = training rows / labelled rows gives it as many steps), and the gain over it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from multirun import mean_std, provenance, run_seeds

REPO = Path(__file__).resolve().parents[1]


def describe(model: dict) -> str:
    """A model config in a few words: its library name, its Hugging Face architecture, or its class."""
    if "name" in model:
        return str(model["name"])
    config = model.get("config") or {}
    if "model_type" in config:
        return f"{config['model_type']} ({config.get('num_hidden_layers')} layers, width {config.get('hidden_size')})"
    return str(model["_target_"]).rsplit(".", 1)[-1]


def table(preset: str, runs: list[dict], long_runs: list[dict], factor: int | None, command: str) -> str:
    kd = [r["metrics"]["test/acc"] for r in runs]
    scratch = [r["scratch"]["test_acc"] for r in runs]
    teacher = [r["metrics"]["teacher/test_acc"] for r in runs]
    gain = [a - b for a, b in zip(kd, scratch, strict=True)]
    long_cells = ""
    if long_runs:
        long = [r["metrics"]["test/acc"] for r in long_runs]
        long_gain = [a - b for a, b in zip(kd, long, strict=True)]
        long_cells = f" {mean_std(long)} | {mean_std(long_gain)} |"
    first = runs[0]
    cfg = first["config"]
    models = f"{describe(cfg['teacher']['model'])} -> {describe(cfg['student']['model'])}"
    return "\n".join(
        [
            f"# {preset}: distilled vs the same student alone",
            "",
            f"Command: `{command}` ({provenance()})",
            "",
            f"{models}; {first['teacher_params']:,} -> {first['student_params']:,} parameters; "
            f"{cfg['trainer']['max_epochs']} epochs; test accuracy (%) of the best-validation checkpoint, "
            f"mean ± std over seeds {', '.join(str(r['config']['seed']) for r in runs)}; gain paired per seed.",
            "",
            "| teacher | distilled student | student alone | gain (points) |"
            + (f" student alone, {factor}x epochs | gain over it |" if long_runs else ""),
            "|---|---|---|---|" + ("---|---|" if long_runs else ""),
            f"| {mean_std(teacher)} | {mean_std(kd)} | {mean_std(scratch)} | {mean_std(gain)} |{long_cells}",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="a conf/experiment name")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--root", type=Path, default=None, help="keep the runs here (default: outputs/kd_gain/<preset>)"
    )
    parser.add_argument("--long-scratch-factor", type=int, default=None, help="also a scratch student F x the epochs")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    factor = args.long_scratch_factor
    overrides = [f"experiment={args.preset}", *args.extra]
    root = args.root or REPO / "outputs" / "kd_gain" / args.preset  # finished sweeps there are reused
    runs = run_seeds(overrides, args.seeds, root / "runs", root / "home")
    long_runs = []
    if factor:
        epochs = runs[0]["config"]["trainer"]["max_epochs"] * factor
        long = [*overrides, "method=supervised", f"trainer.max_epochs={epochs}", "compare_scratch=false"]
        long_runs = run_seeds(long, args.seeds, root / "long_scratch", root / "home")
    seeds = " ".join(map(str, args.seeds))
    command = f"python scripts/kd_gain.py --preset {args.preset} --seeds {seeds} --out {args.out}"
    command += f" --long-scratch-factor {factor}" if factor else ""
    text = table(args.preset, runs, long_runs, factor, command + (f" -- {' '.join(args.extra)}" if args.extra else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
