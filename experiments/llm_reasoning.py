"""Reasoning distillation on 2 CPU cores: a teacher that reasons well on multi-step arithmetic, distilled three ways.

    python experiments/llm_reasoning.py --seeds 0 1 2      # writes the llm-reasoning section of docs/results/llm.md

1. Teacher: SmolLM2-135M-Instruct (GGUF, float32) fine-tuned on multi-step word problems (three operations,
   kd_lightning.llm.prompts kind "multistep") with written-out reference solutions, then its greedy pass rate
   on held-out problems is measured (the verifier reads "The answer is N.").
2. Traces: the teacher samples --samples solutions per training problem (temperature 0.7, top-p 0.95); the
   verifier keeps the correct ones (rejection sampling, as for DeepSeek-R1's distilled models).
3. Student: --student-layers evenly spaced layers of the *base* SmolLM2 (weights copied), trained per seed:
   - gt_sft: cross-entropy on the ground-truth solutions (the baseline: no teacher);
   - traces_sft: cross-entropy on the verified teacher traces (black-box);
   - traces_short: the same, keeping each problem's shortest verified trace ("long-to-short");
   - traces_kd: token-level forward KL to the teacher on those traces, alpha 0.5 (white-box);
   - on_policy: JSD(0.5), half of the batches sampled by the student and scored by the teacher (GKD);
   - on_policy_sft: the same after an SFT warm start (the first half of the steps traces_sft), as GKD starts.
   Held-out greedy pass rates, mean ± std over seeds, against the teacher's and the base models': strict (the
   answer line is right) and flexible (a last number counts without one), re-verified from the kept completions.
Every stage is cached under $KD_LIGHTNING_HOME/runs/llm_reasoning and reused, so an interrupted run resumes;
``--stage table`` writes the table from the finished runs only. experiments/runs/ keeps the records (not the
teacher's weights) behind the published table; its README says how to restore them.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import time
from pathlib import Path

import lightning as L
import torch
from llm_common import (
    RESULTS,
    RESULTS_TITLE,
    adamw,
    finished,
    kd_home,
    llm_config,
    mean_std,
    pass_rate,
    run_key,
    scheme_from_config,
    software,
    software_summary,
    study_command,
    timed_fit,
    verified,
)
from transformers import AutoModelForCausalLM

from kd_lightning.engine.weights import freeze
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.generation import GenerationSettings, generate_file
from kd_lightning.llm.models import layer_subset, load_gguf_model, load_gguf_tokenizer
from kd_lightning.llm.prompts import make_prompts, written_steps
from kd_lightning.llm.records import keep_shortest, read_records
from kd_lightning.methods.lm import SFT
from kd_lightning.reporting.markdown import write_section

#: The students' problems come from another seed than the teacher's fine-tuning problems, so the teacher's
#: traces are its own solutions of problems it was not trained on.
DISTILL_SEED = 1

#: name -> (kd-llm-distill overrides, training data, description)
ARMS = {
    "gt_sft": (["llm/method=sft"], "ground_truth", "CE on ground-truth solutions (no teacher)"),
    "traces_sft": (["llm/method=sft"], "traces", "CE on verified teacher traces (black-box, rejection sampling)"),
    "traces_short": (["llm/method=sft"], "shortest", "CE on the shortest verified trace per problem (long-to-short)"),
    "traces_kd": (["llm/loss=forward_kl"], "traces", "forward KL to the teacher on verified traces, α=0.5 (white-box)"),
    "on_policy": (
        ["llm/method=on_policy", "llm/loss=jsd", "llm.method.lmbda=0.5"],
        "traces",
        "JSD(0.5), half the batches sampled by the student (on-policy)",
    ),
    "on_policy_sft": (
        ["llm/method=on_policy", "llm/loss=jsd", "llm.method.lmbda=0.5"],
        "traces",
        "on_policy after an SFT warm start: half the steps traces_sft, then on_policy (GKD starts from SFT)",
    ),
}
#: arm -> the arm whose objective trains its first half of the steps (the same total as every arm)
WARM_START = {"on_policy_sft": "traces_sft"}


#: the flags the teacher is fine-tuned and evaluated with: its report keeps them, a later invocation must match
TEACHER_FLAGS = (
    "train_problems",
    "teacher_steps",
    "teacher_lr",
    "batch_size",
    "max_length",
    "heldout_problems",
    "max_new_tokens",
)
NEW_EXPERIMENT = "set KD_LIGHTNING_HOME to a new folder (or move {root} away): a new teacher is a new experiment"


def fine_tune_teacher(base, tokenizer, args: argparse.Namespace, root: Path, heldout) -> dict:
    """Fine-tunes the base model on ground-truth step-by-step solutions once (saved under ``root/teacher``, see
    :func:`load_teacher`); returns its report, also kept, with its and the base model's held-out pass rates.
    Stops early rather than mix teachers: when the kept teacher was fine-tuned with other flags, or when records
    of an earlier teacher (traces, finished arms) are in ``root`` without it."""
    folder, report_file = root / "teacher", root / "teacher.json"
    settings = {flag: getattr(args, flag) for flag in TEACHER_FLAGS}
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        changed = {
            f"--{flag.replace('_', '-')}": (report["settings"][flag], value)
            for flag, value in settings.items()
            if report["settings"][flag] != value
        }
        if changed:
            raise SystemExit(
                f"{report_file}: the kept teacher was fine-tuned with other flags {changed} (kept, requested); "
                f"rerun with the kept ones, or {NEW_EXPERIMENT.format(root=root)}"
            )
        return report
    earlier = sorted(path.name for path in [*root.glob("traces_*.jsonl"), *root.glob("*_seed*_*.json")])
    if earlier:
        raise SystemExit(
            f"{root} holds records of an earlier teacher ({', '.join(earlier[:3])}, ...) but not its teacher.json; "
            + NEW_EXPERIMENT.format(root=root)
        )
    L.seed_everything(0, workers=True)
    model = layer_subset(base, num_layers=len(base.model.layers))  # a full copy
    data = LLMDataModule(
        tokenizer,
        train_prompts={"kind": "multistep", "num_prompts": args.train_problems, "seed": 0},
        val_prompts={"kind": "multistep", "num_prompts": 8, "seed": 0, "split": "heldout"},
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    module = SFT(student=model, optimizer=adamw(args.teacher_lr), vocab_size=len(tokenizer))
    seconds = timed_fit(module, data, args.teacher_steps)
    freeze(model)
    report = {
        "settings": settings,
        "steps": args.teacher_steps,
        "train_seconds": seconds,
        "pass_rate": pass_rate(model, tokenizer, heldout, root / "teacher_heldout.jsonl", args.max_new_tokens),
        "base_pass_rate": pass_rate(base, tokenizer, heldout, root / "base_heldout.jsonl", args.max_new_tokens),
        "software": software(),
    }
    model.save_pretrained(folder)
    report_file.write_text(json.dumps(report))
    print(f"teacher: {report}", flush=True)
    return report


@functools.cache
def load_teacher(folder: Path) -> torch.nn.Module:
    """The fine-tuned teacher, loaded only by the stages that run it (sampling traces, token KD, on-policy): every
    stage sees the same saved model, so the traces' model fingerprint matches in every invocation."""
    if not folder.is_dir():
        raise SystemExit(
            f"{folder} is missing: the teacher's report is kept but its weights are not; to fine-tune another, "
            + NEW_EXPERIMENT.format(root=folder.parent)
        )
    return freeze(AutoModelForCausalLM.from_pretrained(folder).float())


def teacher_traces(tokenizer, args: argparse.Namespace, root: Path) -> dict:
    """Sampled teacher solutions of the distillation problems (resumable JSONL) and what the verifier kept; the
    teacher is loaded only while some problem still lacks its samples."""
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.7, top_p=0.95, num_samples=args.samples
    )
    prompts = make_prompts("multistep", args.distill_problems, DISTILL_SEED)
    path = root / f"traces_{args.distill_problems}x{args.samples}_{args.max_new_tokens}tok.jsonl"
    clock = path.with_name(path.name + ".seconds.json")  # sampling time summed over resumed invocations
    seconds = json.loads(clock.read_text()) if clock.is_file() else 0.0
    sampled = collections.Counter(record["id"] for record in read_records(path))
    if any(sampled[prompt.id] < args.samples for prompt in prompts):
        if args.stage == "table":
            raise SystemExit(f"{path} is incomplete: sample the traces first (--stage traces)")
        start = time.perf_counter()
        generate_file(load_teacher(root / "teacher"), tokenizer, prompts, path, settings, batch_size=8, progress=False)
        seconds += time.perf_counter() - start
        clock.write_text(json.dumps(seconds))
    records = read_records(path)
    kept = [record for record in records if record["correct"]]
    problems = len({record["id"] for record in kept})
    return {
        "file": path,
        "seconds": seconds,
        "sample_pass_rate": sum(bool(record["correct"]) for record in records) / max(len(records), 1),
        "kept": len(kept),
        "sampled": len(records),
        "problems_kept": problems,
        "mean_chars": sum(len(r["completion"]) for r in kept) / max(len(kept), 1),
        "shortest_mean_chars": sum(len(r["completion"]) for r in keep_shortest(kept)) / max(problems, 1),
    }


def ground_truth_file(args: argparse.Namespace, root: Path) -> Path:
    """The distillation problems with their reference solutions, as a JSONL the data module reads."""
    path = root / f"ground_truth_{args.distill_problems}.jsonl"
    if not path.is_file():
        rows = [
            {"id": p.id, "prompt": p.text, "completion": p.solution, "answer": p.answer, "correct": True}
            for p in make_prompts("multistep", args.distill_problems, DISTILL_SEED)
        ]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fit_objective(name: str, student, steps: int, seed: int, tokenizer, files: dict, args, root: Path):
    """Trains ``student`` in place for ``steps`` steps with arm ``name``'s objective and data; returns the seconds
    it took and the number of training sequences."""
    overrides, source, _ = ARMS[name]
    cfg = llm_config(overrides)
    data = LLMDataModule(
        tokenizer,
        train_file=str(files["ground_truth" if source == "ground_truth" else "traces"]),
        val_file=str(files["ground_truth"]),
        only_correct=source != "ground_truth",
        shortest=source == "shortest",
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    sampling = {}
    if "generation" in cfg.llm.method:  # the on-policy arms' sampling, at the script's length
        sampling["generation"] = {**cfg.llm.method.generation, "max_new_tokens": args.max_new_tokens}
    module = scheme_from_config(
        cfg,
        vocab_size=len(tokenizer),
        student=student,
        optimizer=adamw(args.lr),
        teacher=None if "llm/method=sft" in overrides else load_teacher(root / "teacher"),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=seed,
        **sampling,
    )
    return timed_fit(module, data, steps), len(data.splits["train"])


def run_arm(
    name: str, seed: int, key: str, base, tokenizer, files: dict, heldout, args: argparse.Namespace, root: Path
) -> dict:
    """Train one student arm from the base model's layers (after its warm start, if it has one); returns its
    held-out pass rate and timing."""
    L.seed_everything(seed, workers=True)
    student = layer_subset(base, num_layers=args.student_layers)
    warm_steps = args.steps // 2 if name in WARM_START else 0
    seconds = 0.0
    if warm_steps:
        seconds, _ = fit_objective(WARM_START[name], student, warm_steps, seed, tokenizer, files, args, root)
    train_seconds, examples = fit_objective(name, student, args.steps - warm_steps, seed, tokenizer, files, args, root)
    rate = pass_rate(student, tokenizer, heldout, heldout_file(root, key), args.max_new_tokens)
    result = {
        "arm": name,
        "seed": seed,
        "pass_rate": rate,
        "train_seconds": seconds + train_seconds,
        "examples": examples,
    }
    print(json.dumps(result), flush=True)
    return result


def heldout_file(root: Path, key: str) -> Path:
    """Where the run under ``key`` (:func:`run_key`) keeps its held-out completions, which the table re-scores:
    keyed like the run's result, so a run under other settings never overwrites them."""
    return root / f"{key}_heldout.jsonl"


def student_base_file(root: Path, args: argparse.Namespace) -> Path:
    """The untrained student's held-out completions, keyed by what they depend on."""
    return root / f"student_base_{args.student_layers}_{args.heldout_problems}x{args.max_new_tokens}tok_heldout.jsonl"


def traces_summary(traces: dict | None, args: argparse.Namespace) -> str:
    """What the table says about the verified traces (or that this invocation sampled none)."""
    sampled = f"{args.samples} samples (T 0.7, top-p 0.95) for each of {args.distill_problems} other problems"
    if traces is None:
        return f"Traces: none in this invocation (only the ground-truth arm ran; the trace arms draw {sampled})."
    return (
        f"Traces: {sampled} (not in the teacher's fine-tuning set); the verifier kept {traces['kept']} of "
        f"{traces['sampled']} ({traces['problems_kept']} problems with at least one; mean "
        f"{traces['mean_chars']:.0f} characters, {traces['shortest_mean_chars']:.0f} for the shortest per problem)."
    )


def equations_right(paths: list[Path], spread: bool = True) -> str:
    """The share of written equations (:func:`written_steps`) that are right in each file of held-out completions:
    a graded view of the arithmetic beside the pass rate; mean ± std over ``paths``, or one file's value."""
    rates = []
    for path in paths:
        steps = [right for record in read_records(path) for _, right in written_steps(record["completion"])]
        rates.append(sum(steps) / len(steps) if steps else 0.0)
    return mean_std(rates) if spread else f"{100 * rates[0]:.1f}"


def steps_summary(root: Path, traces: dict | None) -> str:
    """A process check the outcome verifier does not make: how often the teacher's written equations are right,
    per operation, and how many kept traces reach the right answer through a wrong one (they are still kept)."""
    steps = collections.defaultdict(list)
    for record in read_records(root / "teacher_heldout.jsonl"):
        for op, right in written_steps(record["completion"]):
            steps[op].append(right)
    rates = ", ".join(f"`{op}` {100 * sum(v) / len(v):.0f}% of {len(v)}" for op, v in sorted(steps.items()))
    rates = rates or "it writes none"
    text = (
        f"Written steps (checked one by one, not used to filter): the teacher's held-out equations are right: {rates}."
    )
    if traces is not None:
        kept = [record for record in read_records(traces["file"]) if record["correct"]]
        lucky = sum(not all(right for _, right in written_steps(record["completion"])) for record in kept)
        text += f" {lucky} of the {len(kept)} kept traces reach the right answer through a wrong equation."
    return text


def write_table(
    results: list[dict],
    missing: list[str],
    report: dict,
    traces: dict | None,
    args: argparse.Namespace,
    root: Path,
    timing: dict,
) -> None:
    seeds = sorted({r["seed"] for r in results})

    def single(name: str) -> str:
        return f"{verified([root / name], spread=False)} | {equations_right([root / name], spread=False)}"

    rows = [
        f"| teacher (base) | SmolLM2-135M-Instruct before fine-tuning | — | {single('base_heldout.jsonl')} | — |",
        f"| teacher | fine-tuned on {args.train_problems} problems' reference solutions ({report['steps']} steps) | "
        f"— | {single('teacher_heldout.jsonl')} | {report['train_seconds']:.0f} |",
        f"| student (base) | {args.student_layers} layers of the base model, untrained | — | "
        f"{single(student_base_file(root, args).name)} | — |",
    ]
    for name, (_, _, description) in ARMS.items():
        runs = [r for r in results if r["arm"] == name]
        if runs:
            rows.append(
                f"| {name} | {description} ({runs[0]['examples']} training sequences) | "
                f"{', '.join(str(r['seed']) for r in runs)} | "
                f"{verified(files := [heldout_file(root, r['key']) for r in runs])} | "
                f"{equations_right(files)} | "
                f"{mean_std([r['train_seconds'] for r in runs], 1.0, 0)} |"
            )
    command = study_command("llm_reasoning.py", args.stage)
    lines = [
        "<!-- written by experiments/llm_reasoning.py; do not edit by hand -->",
        "## Reasoning distillation: a fine-tuned SmolLM2 reasoner -> a small student (CPU)",
        "",
        f"Command: {command}",
        "",
        "Task: multi-step word problems (three operations: gets more, buys bags of, gives away; "
        "`kd_lightning.llm.prompts`, kind `multistep`), answered with written-out steps ending in "
        "'The answer is N.'; a verifier checks that number (see Metric). Training and held-out problems are disjoint.",
        "",
        f"Teacher: SmolLM2-135M-Instruct fine-tuned on the reference solutions of {args.train_problems} problems "
        f"(AdamW lr {args.teacher_lr}, batch {args.batch_size}). {traces_summary(traces, args)} "
        f"Students: {args.student_layers} of the "
        f"base model's 30 layers (weights copied), {args.steps} steps of {args.batch_size} sequences, "
        f"AdamW lr {args.lr}; "
        f"the ground-truth baseline trains on the same {args.distill_problems} problems' reference solutions. "
        + (f"Mean ± std over seeds {seeds}." if not missing else "Mean ± std over each row's seeds."),
        "",
        f"Metric: greedy pass rate (%) on {args.heldout_problems} held-out problems "
        f"(at most {args.max_new_tokens} new tokens), re-verified from the kept completions: **strict** counts "
        "an answer line 'The answer is N.' with the right N; **flexible** also takes the last number of a "
        "completion without one (lm-eval-harness's strict-match and flexible-extract); **answer line** is the "
        "share of completions that have one; **equations right** is the share of the written equations "
        "`a op b = c` whose result is right (0 for a model that writes none).",
        "",
        "| model | what | seeds | pass % strict | pass % flexible | answer line % | equations right % | "
        "train time (s) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        steps_summary(root, traces),
        "",
        *([f"Not run yet: {', '.join(missing)}.", ""] if missing else []),
        f"Timings ({args.threads} torch thread on 2 CPU cores shared with other jobs, indicative): "
        + (f"sampling the teacher traces {traces['seconds']:.0f} s, " if traces else "")
        + f"this invocation {timing['total']:.0f} s (finished stages are reused). "
        + software_summary([report, *results]),
    ]
    text = "\n".join(lines)
    write_section(args.out, text, "llm-reasoning", title=RESULTS_TITLE)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--stage",
        choices=["teacher", "traces", "all", "table"],
        default="all",
        help="stop after the teacher or the traces; or 'table': write the table from the finished runs only, "
        "listing the seeds and arms not run yet",
    )
    parser.add_argument("--train-problems", type=int, default=512, help="the teacher's fine-tuning problems")
    parser.add_argument("--distill-problems", type=int, default=256, help="problems the students learn from")
    parser.add_argument("--heldout-problems", type=int, default=64)
    parser.add_argument(
        "--teacher-steps",
        type=int,
        default=300,
        help="fine-tuning steps: 150 passed 47%% of the held-out problems, 300 passed 64%% and 66%% in two fine-tunes",
    )
    parser.add_argument("--teacher-lr", type=float, default=2e-4)
    parser.add_argument("--samples", type=int, default=4, help="teacher traces per distillation problem")
    parser.add_argument("--student-layers", type=int, default=10)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    root = kd_home() / "runs" / "llm_reasoning"
    root.mkdir(parents=True, exist_ok=True)
    base, tokenizer = freeze(load_gguf_model()), load_gguf_tokenizer()
    heldout = make_prompts("multistep", args.heldout_problems, 0, "heldout")
    if args.stage == "table" and not (root / "teacher.json").is_file():
        raise SystemExit(f"no fine-tuned teacher under {root}: --stage table only reports finished runs")
    report = fine_tune_teacher(base, tokenizer, args, root, heldout)
    if args.stage == "teacher":
        return
    traces = None  # the ground-truth baseline needs no traces: it can train while the teacher samples them
    if args.stage == "traces" or any(ARMS[name][1] != "ground_truth" for name in args.arms):
        traces = teacher_traces(tokenizer, args, root)
        print(f"traces: {traces}", flush=True)
    if args.stage == "traces":
        return
    files = {"traces": traces and traces["file"], "ground_truth": ground_truth_file(args, root)}
    base_completions = student_base_file(root, args)
    base_done = base_completions.with_name(base_completions.name.replace("_heldout.jsonl", ".json"))
    if not base_done.is_file():  # written once its completions are complete
        untrained = layer_subset(base, num_layers=args.student_layers)
        rate = pass_rate(untrained, tokenizer, heldout, base_completions, args.max_new_tokens)
        base_done.write_text(json.dumps({"pass_rate": rate}))
    results, missing = [], []
    ignore = ("seeds", "arms", "stage", "out", "threads")
    for seed in args.seeds:
        for name in args.arms:
            key = run_key(name, seed, args, ignore)
            done = root / f"{key}.json"
            if not done.exists() and args.stage == "table":
                missing.append(f"{name} seed {seed}")
                continue
            record = finished(
                done, functools.partial(run_arm, name, seed, key, base, tokenizer, files, heldout, args, root)
            )
            results.append({**record, "key": key})
    timing = {"total": time.perf_counter() - start}
    write_table(results, missing, report, traces, args, root, timing)


if __name__ == "__main__":
    main()
