"""LM objectives and students beside forward KL on 2 CPU cores: SmolLM2-135M-Instruct -> 8 of its 30 layers.

    python experiments/llm_objectives.py --seeds 0 1 2   # writes the llm-objectives section of docs/results/llm.md
    python experiments/llm_objectives.py --seeds 0 1 2 --stage table   # the table from the finished runs only

The demo's teacher, teacher data and held-out metrics (experiments/llm_demo.py: its ``teacher_data`` and runs, reused
here), one student per arm, each composed from the kd-llm-distill configs:

- ``fkl``: token KD with forward KL on the teacher's text, 8 evenly spaced layers copied (the demo's baseline);
- ``rkl_sampled``: on-policy sampled-token reverse KL (llm/loss=reverse_kl_sampled, every batch sampled by the
  student, only the teacher's log-prob of each sampled token read);
- ``fkl_hidden``: forward KL + the cosine distance of every student layer's output to its source layer's in the
  teacher (llm/hidden=cosine);
- ``pruned_fkl``: forward KL into the 8 layers a calibration pass ranks most important (llm/student=pruned, Minitron).

Before training, the kd-llm-distill pre-flight for known KD bugs runs once per arm on the real pair (first seed):
its checks passed and seconds go under the table. Every finished run and pre-flight is kept under
$KD_LIGHTNING_HOME/runs/llm_objectives and reused, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import re
import time

import torch
from llm_common import RESULTS_TITLE, finished, kd_home, mean_std, run_key, software_summary, study_command
from llm_demo import add_study_arguments, build_run, run_one, teacher_data
from multirun import provenance

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.models import decoder_layers, evenly_spaced, load_gguf_model, load_gguf_tokenizer
from kd_lightning.recipes.llm_bug_checks import preflight_bugs
from kd_lightning.reporting.markdown import write_section

SECTION = "llm-objectives"
#: arguments that do not change a run's result
IGNORED_ARGS = ("seeds", "arms", "stage", "out", "threads")
FKL = ["llm/loss=forward_kl", "llm.loss.alpha=1"]
ARMS = ("fkl", "rkl_sampled", "fkl_hidden", "pruned_fkl")


def arms(args: argparse.Namespace, teacher_layers: int) -> dict[str, tuple[list[str], str, str]]:
    """name -> (kd-llm-distill overrides, training data, description), as llm_demo's ``RUNS``."""
    kept = evenly_spaced(teacher_layers, args.num_layers)  # the layer subset's teacher layers, 0-based
    layer_map = "{" + ",".join(f"{i + 1}:{index + 1}" for i, index in enumerate(kept)) + "}"  # outputs, 1-based
    return {
        "fkl": (FKL, "instructions", "token KD, forward KL, off-policy, evenly spaced layers copied (baseline)"),
        "rkl_sampled": (
            ["llm/method=on_policy", "llm/loss=reverse_kl_sampled"],
            "instructions",
            "on-policy sampled-token reverse KL: every batch sampled by the student, the teacher's log-prob of each "
            "sampled token weights its score function (the k1 and k3 estimators share this gradient)",
        ),
        "fkl_hidden": (
            [*FKL, "llm/hidden=cosine", f"llm.hidden.layers={layer_map}", f"llm.hidden.weight={args.hidden_weight}"],
            "instructions",
            f"forward KL + {args.hidden_weight} x cosine distance of each student layer's output to its source "
            "teacher layer's",
        ),
        "pruned_fkl": (
            [*FKL, "llm/student=pruned", f"llm.student.keep_layers={args.num_layers}"],
            "instructions",
            f"forward KL into the {args.num_layers} layers ranked most important by the calibration pass "
            "(1 - cos of each layer's input and output; Minitron depth pruning)",
        ),
    }


def preflight(name: str, teacher, tokenizer, data: dict, args: argparse.Namespace, runs: dict) -> dict:
    """The kd-llm-distill pre-flight on one untrained arm (first seed): its line, checks passed and wall time, or
    the one line it stopped with."""
    _, datamodule, module = build_run(name, args.seeds[0], teacher, tokenizer, data, args, runs)
    datamodule.setup()  # as kd-llm-distill's token-id check does before the pre-flight
    printed, start = io.StringIO(), time.perf_counter()
    try:
        with contextlib.redirect_stdout(printed):
            preflight_bugs(module, datamodule, tokenizer)
        line = printed.getvalue().strip().splitlines()[-1].removeprefix("kd_lightning: ")
        checks = int(re.search(r"(\d+) checks? passed", line).group(1))
    except ConfigError as error:
        line, checks = f"stopped: {error}", 0
    result = {"run": name, "seconds": time.perf_counter() - start, "checks": checks, "line": line}
    print(result, flush=True)
    return result


def write_table(
    results: list, checks: list, missing: list, runs: dict, args: argparse.Namespace, seconds: float
) -> None:
    rows = []
    described = {"init": f"student before training ({args.num_layers} evenly spaced layers)"}
    described.update({name: description for name, (_, _, description) in runs.items()})
    for name, description in described.items():
        done = [r for r in results if r["run"] == name]
        if done:
            ppl = [r["ppl"] for r in done]
            rows.append(
                f"| {name} | {description} | {', '.join(str(r['seed']) for r in done)} | "
                f"{mean_std([r['kl_to_teacher'] for r in done], 1.0, 3)} | "
                f"{mean_std(ppl, 1.0, 2 if max(ppl) < 100 else 0)} | "
                f"{mean_std([r['pass_rate'] for r in done], 100.0, 1)} | "
                f"{mean_std([r['train_seconds'] for r in done], 1.0, 0)} |"
            )
    command = study_command("llm_objectives.py", args.stage)
    lines = [
        "<!-- written by experiments/llm_objectives.py; do not edit by hand -->",
        f"## LM objectives and students: SmolLM2-135M-Instruct -> {args.num_layers}-layer student (CPU)",
        "",
        f"Command: {command}; {provenance()}.",
        "",
        "Teacher, teacher data and metrics as in the demo section (`experiments/llm_demo.py`): SmolLM2-135M-Instruct "
        f"(GGUF, float32); students of {args.num_layers} of its 30 layers, every kept weight copied, fully fine-tuned "
        f"with AdamW (lr {args.lr}, batch {args.batch_size}, {args.steps} steps, sequences of at most "
        f"{args.max_length} tokens, on-policy samples of at most {args.max_new_tokens} new tokens) on the teacher's "
        f"greedy completions of {args.train_prompts} templated instructions. **KL** = token-level KL(teacher || "
        f"student) and **ppl** = student perplexity on the teacher's completions of {args.heldout_prompts} held-out "
        f"instructions; **pass rate** = greedy answers to {args.heldout_prompts} held-out arithmetic problems the "
        "verifier accepts. Mean ± std over each row's seeds (std 0 for one seed).",
        "",
        "| run | what | seeds | KL to teacher ↓ | ppl on teacher text ↓ | arithmetic pass rate % | train time (s) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Pre-flight for known KD bugs (`kd_lightning/recipes/llm_bug_checks.py`, as `kd-llm-distill` runs it "
        f"before fit), once per arm on its untrained student and first batch (seed {args.seeds[0]}):",
        "",
        "| run | checks passed | seconds | its line |",
        "|---|---|---|---|",
        *[f"| {c['run']} | {c['checks']} | {c['seconds']:.1f} | {c['line']} |" for c in checks],
        "",
        *([f"Not run yet: {', '.join(missing)}.", ""] if missing else []),
        f"Timings ({args.threads} torch thread(s) on 2 CPU cores shared with other jobs: indicative only): this "
        f"invocation {seconds:.0f} s (finished runs are reused, not rerun). " + software_summary(results),
    ]
    text = "\n".join(lines)
    write_section(args.out, text, SECTION, title=RESULTS_TITLE)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--stage", choices=["all", "table"], default="all", help="table: from finished runs only")
    parser.add_argument("--hidden-weight", type=float, default=1.0)
    add_study_arguments(parser)  # the demo's (same defaults: its cached teacher files are reused)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    home = kd_home()
    out_dir = home / "runs" / "llm_objectives"
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = load_gguf_model(), load_gguf_tokenizer()
    runs = arms(args, len(decoder_layers(teacher)))
    data = teacher_data(teacher, tokenizer, args, home / "data" / "llm_demo") if args.stage == "all" else None
    results, checks, missing = [], [], []

    def kept(name: str, seed: int, make, keep=lambda record: True) -> dict | None:
        path = out_dir / f"{run_key(name, seed, args, IGNORED_ARGS)}.json"
        if args.stage == "table" and not path.is_file():
            missing.append(f"{name} seed {seed}")
            return None
        record = finished(path, make)
        if not keep(record):  # reported, not kept: the next invocation runs it again
            path.unlink()
        return record

    for name in args.arms:  # the pre-flight, once per arm (first seed)
        make = functools.partial(preflight, name, teacher, tokenizer, data, args, runs)
        checks.append(kept(f"preflight_{name}", args.seeds[0], make, keep=lambda record: record["checks"] > 0))
    for seed in args.seeds:
        for name in ["init", *args.arms] if seed == args.seeds[0] else args.arms:  # init does not depend on the seed
            make = functools.partial(run_one, name, seed, teacher, tokenizer, data, args, out_dir, runs)
            results.append(kept(name, seed, make))
    results, checks = [r for r in results if r], [c for c in checks if c]
    write_table(results, checks, missing, runs, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
