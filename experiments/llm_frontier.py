"""Measured rows for the LM-frontier features on 2 CPU cores, with SmolLM2-135M-Instruct (GGUF, float32):

    python experiments/llm_frontier.py --seeds 0 1 2      # writes the llm-frontier section of docs/results/llm.md

- distillm2: DistiLLM-2's contrastive objective against forward KL and SFT on the same teacher text, from the
  copied layers and after an SFT warm start as the paper trains (student: 8 of the teacher's layers, as in
  experiments/llm_demo.py);
- routing: one student, two teachers picked per row (instructions -> SmolLM2, multi-step problems -> the
  reasoner fine-tuned by experiments/llm_reasoning.py, which must have run first), against the SmolLM2 teacher
  alone; KL to each row's own teacher and the multi-step pass rate;
- remote: the grey-box top-k cache built through an OpenAI-compatible server (kd_lightning.llm.local_server on
  127.0.0.1 serving the same model) against the in-process cache: agreement and scoring time.
Teacher text: greedy completions of instructions (shared with experiments/llm_cross_tokenizer.py). Finished runs are
kept under $KD_LIGHTNING_HOME/runs/llm_frontier and reused; experiments/runs/ keeps the records behind the
published table (see its README).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import lightning as L
import numpy as np
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
    scheme_from_config,
    software_summary,
    timed_fit,
    validate,
    verified,
)
from llm_cross_tokenizer import teacher_text
from transformers import AutoModelForCausalLM

from kd_lightning.engine.weights import freeze
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.local_server import OpenAIServer
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import layer_subset, load_gguf_model, load_gguf_tokenizer
from kd_lightning.llm.prompts import make_prompts
from kd_lightning.llm.records import read_records
from kd_lightning.llm.remote import RemoteTeacher
from kd_lightning.llm.teacher_combinations import RowRouting
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.methods.lm import LMMethod, MultiTeacher, TokenKD
from kd_lightning.reporting.markdown import write_section

OBJECTIVES = {
    "sft": (["llm/method=sft"], "CE on teacher text"),
    "fkl": (["llm/loss=forward_kl", "llm.loss.alpha=1"], "forward KL (word-level KD)"),
    "distillm2": (["llm/method=distillm2"], "DistiLLM-2: SKL on teacher text + SRKL on the student's own responses"),
    "distillm2_sft": (
        ["llm/method=distillm2"],
        "DistiLLM-2 after an SFT warm start (half the steps sft; responses from the warm student, as in the paper)",
    ),
}
#: objective -> the objective that trains its first half of the steps (the same total as every objective)
WARM_START = {"distillm2_sft": "sft"}


def module_for(name: str, seed: int, student, tokenizer, args, **teachers) -> LMMethod:
    """Objective ``name``'s scheme, as kd-llm-distill composes it, over the tokenizer's vocabulary."""
    cfg = llm_config([*OBJECTIVES[name][0], f"seed={seed}"])
    return scheme_from_config(
        cfg,
        vocab_size=len(tokenizer),
        student=student,
        optimizer=adamw(args.lr),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **teachers,
    )


def text_data(tokenizer, files: dict, args, max_length: int, **options) -> LLMDataModule:
    """The run's train / held-out JSONL files as a data module (held-out batches of 16)."""
    return LLMDataModule(
        tokenizer,
        train_file=str(files["train"]),
        val_file=str(files["heldout"]),
        max_length=max_length,
        batch_size=args.batch_size,
        val_batch_size=16,
        **options,
    )


def objective_run(name: str, seed: int, teacher, tokenizer, files: dict, args, root: Path) -> dict:
    L.seed_everything(seed, workers=True)
    student = layer_subset(teacher, num_layers=8)
    warm_steps = args.steps // 2 if name in WARM_START else 0
    seconds = 0.0
    if warm_steps:  # the warm start's data module is its own: the responses below are the warm student's
        warm = module_for(WARM_START[name], seed, student, tokenizer, args, teacher=teacher)
        seconds = timed_fit(warm, text_data(tokenizer, files, args, max_length=160), warm_steps)
    module = module_for(name, seed, student, tokenizer, args, teacher=teacher)
    data = text_data(tokenizer, files, args, max_length=160)
    start = time.perf_counter()
    module.before_fit(data, tokenizer, root)  # DistiLLM-2: the student's responses, under root/distillm2
    responses_seconds = time.perf_counter() - start
    seconds += timed_fit(module, data, args.steps - warm_steps)
    metrics = validate(module, data)
    return {
        "run": name,
        "seed": seed,
        "train_seconds": seconds,
        "responses_seconds": responses_seconds,
        "kl": metrics["val/kl_to_teacher"],
        "ppl": metrics["val/ppl"],
    }


def untrained_run(teacher, tokenizer, files: dict, args) -> dict:
    """KL and perplexity of the copied layers before any training: the objectives' common starting point."""
    student = layer_subset(teacher, num_layers=8)
    loss = TokenDistillationLoss(ForwardKL(), alpha=1.0, vocab_size=len(tokenizer))
    module = TokenKD(student=student, loss=loss, teacher=teacher, optimizer=adamw(args.lr))
    metrics = validate(module, text_data(tokenizer, files, args, 160))
    return {"kl": metrics["val/kl_to_teacher"], "ppl": metrics["val/ppl"]}


def routed_files(files: dict, root: Path, args) -> dict[str, Path]:
    """Instruction rows (teacher text) and multi-step rows (reference solutions), one JSONL per split."""
    out = {}
    for split, count in (("train", args.train_prompts), ("heldout", args.heldout_prompts)):
        rows = [{**r, "kind": "instructions"} for r in read_records(files[split])]
        rows += [
            {"id": p.id, "prompt": p.text, "completion": p.solution, "kind": "multistep"}
            for p in make_prompts("multistep", count, 1 if split == "train" else 0, split)
        ]
        out[split] = root / f"routed_{split}_{count}.jsonl"
        out[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return out


def load_reasoner(reasoning_runs: Path) -> torch.nn.Module:
    """The multi-step reasoner that experiments/llm_reasoning.py fine-tuned (its saved teacher)."""
    folder = reasoning_runs / "teacher"
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: run experiments/llm_reasoning.py --stage teacher first")
    return freeze(AutoModelForCausalLM.from_pretrained(folder).float())


def reasoner_report(reasoning_runs: Path) -> dict | None:
    """Which reasoner the routed problems are distilled from: the fine-tuning steps and held-out pass rate of
    experiments/llm_reasoning.py's kept teacher (``None`` without its report)."""
    report_file = reasoning_runs / "teacher.json"
    if not report_file.is_file():
        return None
    report = json.loads(report_file.read_text())
    return {"steps": report["steps"], "pass_rate": report["pass_rate"]}


def same_reasoner(path: Path, record: dict, reasoner: dict | None) -> dict:
    """``record`` (kept at ``path``) if it was routed with the kept reasoner; stops rather than report routing runs
    of another reasoner beside it (with no reasoner kept, the records say which they had)."""
    if reasoner is not None and record.get("reasoner") != reasoner:
        raise SystemExit(
            f"{path} was routed with the reasoner {record.get('reasoner')} (fine-tuning steps, held-out pass rate), "
            f"not the kept one {reasoner}: move it away to rerun, or use the reasoning runs it came from"
        )
    return record


def routing_run(name: str, seed: int, teachers: dict, tokenizer, files: dict, args, root: Path) -> dict:
    L.seed_everything(seed, workers=True)
    student = layer_subset(teachers["chat"], num_layers=8)
    routing = RowRouting(by_kind={"instructions": "chat", "multistep": "math"})
    routing.bind(list(teachers))
    data = text_data(tokenizer, files, args, max_length=192, routing=routing)
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, vocab_size=len(tokenizer))
    used = teachers if name == "routed" else {"chat": teachers["chat"], "math": teachers["chat"]}
    common = {"student": student, "loss": loss, "optimizer": adamw(args.lr), "combination": routing}
    module = MultiTeacher(**common, teachers=used)
    seconds = timed_fit(module, data, args.steps)
    judge = MultiTeacher(**common, teachers=teachers)  # KL to each row's own teacher
    metrics = validate(judge, data)
    heldout = make_prompts("multistep", args.heldout_prompts, 0, "heldout")
    rate = pass_rate(student, tokenizer, heldout, routing_file(root, name, seed, args), 96)
    return {
        "run": name,
        "seed": seed,
        "train_seconds": seconds,
        "kl_chat": metrics["val/kl_to_teacher/chat"],
        "kl_math": metrics["val/kl_to_teacher/math"],
        "pass_rate": rate,
    }


def reasoner_text(routing: list[dict]) -> str:
    """The routing table's words for its math teacher, from what the records kept."""
    reasoner = routing[0].get("reasoner")
    if reasoner is None:
        return "the reasoner experiments/llm_reasoning.py fine-tuned (not recorded which)"
    return (
        f"the reasoner experiments/llm_reasoning.py fine-tuned for {reasoner['steps']} steps, "
        f"{100 * reasoner['pass_rate']:.1f}% held-out"
    )


def run_tag(args) -> str:
    """The settings a finished run is kept under (in its file names)."""
    return f"{args.steps}x{args.batch_size}_lr{args.lr}_{args.train_prompts}"


def routing_file(root: Path, name: str, seed: int, args) -> Path:
    """The held-out multi-step completions of routing run ``name``, which the table re-verifies: keyed like the
    run's result, so a run under other settings never overwrites them."""
    return root / f"routing_{name}_{seed}_{run_tag(args)}.jsonl"


def example_rows(cache: LogitCache) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache's top-k ids and log-probs, example by example in key order: two caches of the same examples
    line up row for row even when their loaders were shuffled differently (rows are stored in loader order)."""
    rows = np.concatenate([np.arange(start, start + count) for _, (start, count) in sorted(cache.index.items())])
    log_probs = cache.arrays["log_probs"][rows].astype("float32")
    return torch.from_numpy(cache.arrays["ids"][rows]), torch.from_numpy(log_probs)


def remote_check(teacher, tokenizer, files: dict, args, root: Path) -> dict:
    """The top-k cache through a local OpenAI-compatible server vs in process, on the same examples."""
    data = text_data(tokenizer, files, args, max_length=160)
    loaders = [data.train_dataloader(), data.val_dataloader()]
    start = time.perf_counter()
    local = LogitCache.build(
        teacher, loaders, root / "cache_local", top_k=32, temperature=1.0, vocab_size=len(tokenizer)
    )
    local_seconds = time.perf_counter() - start
    with OpenAIServer(teacher, tokenizer, name="smollm2") as server:
        served = RemoteTeacher(server.base_url, "smollm2", timeout=600, concurrency=4)
        start = time.perf_counter()
        remote = LogitCache.build(
            served, loaders, root / "cache_remote", top_k=32, temperature=1.0, vocab_size=len(tokenizer)
        )
        remote_seconds = time.perf_counter() - start
        requests = server.requests
    local_ids, local_log_probs = example_rows(local)
    remote_ids, remote_log_probs = example_rows(remote)
    same_ids = (local_ids == remote_ids).float().mean()
    # a slot can differ only where tied log-probs are ordered differently: then the token's top-k *set* is the same
    same_sets = (local_ids.sort(dim=-1).values == remote_ids.sort(dim=-1).values).all(dim=-1).float().mean()
    diff = (local_log_probs - remote_log_probs).abs().max()
    return {
        "tokens": int(local.meta["num_tokens"]),
        "sequences": len(local.index),
        "local_seconds": local_seconds,
        "remote_seconds": remote_seconds,
        "requests": requests,
        "same_ids": float(same_ids),
        "same_sets": float(same_sets),
        "max_abs_log_prob_diff": float(diff),
    }


def cached(path: Path, make) -> dict:
    """:func:`finished`, printed."""
    result = finished(path, make)
    print(json.dumps(result), flush=True)
    return result


def write_table(
    objective: list[dict],
    untrained: dict | None,
    routing: list[dict],
    remote: dict | None,
    args,
    root: Path,
    timing: dict,
) -> None:
    seeds = sorted({r["seed"] for r in objective + routing})
    lines = [
        "<!-- written by experiments/llm_frontier.py; do not edit by hand -->",
        "## Frontier objectives and teachers: DistiLLM-2, per-row routing, a remote teacher (CPU)",
        "",
        f"Command: `{' '.join(['python experiments/llm_frontier.py', *sys.argv[1:]])}`. Students: 8 of SmolLM2-135M's "
        f"30 layers (weights copied), {args.steps} steps of {args.batch_size} sequences, AdamW lr {args.lr}; "
        f"mean ± std over seeds {seeds}. Held-out: {args.heldout_prompts} instructions (teacher text) and, for "
        f"routing, {args.heldout_prompts} multi-step problems.",
        "",
    ]
    if objective:
        lines += [
            "| objective | what | KL to teacher ↓ | ppl on teacher text ↓ | train time (s) |",
            "|---|---|---|---|---|",
            f"| untrained | the 8 copied layers before training | {untrained['kl']:.3f} | {untrained['ppl']:.3g} | — |",
        ]
        for name, (_, description) in OBJECTIVES.items():
            runs = [r for r in objective if r["run"] == name]
            if runs:
                lines.append(
                    f"| {name} | {description} | {mean_std([r['kl'] for r in runs], 1.0, 3)} | "
                    f"{mean_std([r['ppl'] for r in runs], 1.0, 1)} | "
                    f"{mean_std([r['train_seconds'] for r in runs], 1.0, 0)} |"
                )
        lines.append("")
    if routing:
        lines += [
            "Routing: training rows are instructions with SmolLM2's completions and multi-step problems with "
            "reference solutions; `routed` distils each row from its own teacher (instructions: SmolLM2, problems: "
            f"{reasoner_text(routing)}), `one teacher` distils every row from SmolLM2. KL is "
            "measured against each held-out row's own teacher.",
            "",
            "Multi-step pass rates are re-verified from the kept completions, as in the reasoning section: "
            "strict needs the answer line 'The answer is N.', flexible also takes a completion's last number.",
            "",
            "| teachers | KL to SmolLM2 on instructions ↓ | KL to the reasoner on problems ↓ | "
            "pass % strict | pass % flexible | answer line % | train time (s) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, label in (("routed", "routed (SmolLM2 + reasoner)"), ("single", "one teacher (SmolLM2)")):
            runs = [r for r in routing if r["run"] == name]
            if runs:
                lines.append(
                    f"| {label} | {mean_std([r['kl_chat'] for r in runs], 1.0, 3)} | "
                    f"{mean_std([r['kl_math'] for r in runs], 1.0, 3)} | "
                    f"{verified([routing_file(root, name, r['seed'], args) for r in runs])} | "
                    f"{mean_std([r['train_seconds'] for r in runs], 1.0, 0)} |"
                )
        lines.append("")
    if remote:
        slots = remote["tokens"] * 32
        lines += [
            "Remote teacher: the top-32 logit cache of the training and held-out sequences built through the "
            "OpenAI-compatible API (`kd_lightning.llm.local_server` on 127.0.0.1 serving SmolLM2, concurrency 4) and "
            "in process, on the same examples.",
            "",
            "| path | sequences | tokens | requests | build time (s) | top-32 ids in the same slot | tokens with the "
            "same top-32 set | max abs log-prob diff |",
            "|---|---|---|---|---|---|---|---|",
            f"| in-process | {remote['sequences']} | {remote['tokens']} | — | {remote['local_seconds']:.0f} "
            "| — | — | — |",
            f"| remote (OpenAI-compatible) | {remote['sequences']} | {remote['tokens']} | {remote['requests']} | "
            f"{remote['remote_seconds']:.0f} | {slots - round((1 - remote['same_ids']) * slots)} of {slots} | "
            f"{100 * remote['same_sets']:.2f}% | {remote['max_abs_log_prob_diff']:.4f} (the cache stores float16) |",
            "",
        ]
    lines.append(
        f"Timings: 1 torch thread on 2 CPU cores shared with other jobs (indicative); this invocation "
        f"{timing['total']:.0f} s, finished runs reused. "
        + software_summary([*objective, *([untrained] if untrained else []), *routing, *([remote] if remote else [])])
    )
    text = "\n".join(lines)
    write_section(args.out, text, "llm-frontier", title=RESULTS_TITLE)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--parts", nargs="+", default=["distillm2", "routing", "remote"], choices=["distillm2", "routing", "remote"]
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--train-prompts", type=int, default=160)
    parser.add_argument("--heldout-prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    home = kd_home()
    root = home / "runs" / "llm_frontier"
    root.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = freeze(load_gguf_model()), load_gguf_tokenizer()
    files = teacher_text(teacher, tokenizer, args, home / "data" / "llm_demo")
    tag = run_tag(args)
    objective, untrained, routing, remote = [], None, [], None
    if "distillm2" in args.parts:
        untrained = cached(
            root / f"untrained_{args.heldout_prompts}.json", lambda: untrained_run(teacher, tokenizer, files, args)
        )
        objective = [
            cached(
                root / f"{name}_{seed}_{tag}.json",
                lambda n=name, s=seed: objective_run(n, s, teacher, tokenizer, files, args, root),
            )
            for seed in args.seeds
            for name in OBJECTIVES
        ]
    if "routing" in args.parts:
        # the reasoner is loaded (and the routed files written) only when some routing run is not finished yet
        teachers = functools.cache(lambda: {"chat": teacher, "math": load_reasoner(root.parent / "llm_reasoning")})
        mixed = functools.cache(lambda: routed_files(files, root, args))
        reasoner = reasoner_report(root.parent / "llm_reasoning")
        runs = [
            (name, seed, root / f"routing_{name}_{seed}_{tag}.json")
            for seed in args.seeds
            for name in ("routed", "single")
        ]
        for _, _, path in runs:  # before any training: kept runs of another reasoner stop the script early
            if path.is_file():
                same_reasoner(path, json.loads(path.read_text()), reasoner)
        for name, seed, path in runs:
            record = cached(
                path,
                lambda n=name, s=seed: {
                    **routing_run(n, s, teachers(), tokenizer, mixed(), args, root),
                    "reasoner": reasoner,
                },
            )
            routing.append(record)
    if "remote" in args.parts:
        remote = cached(
            root / f"remote_{args.train_prompts}.json", lambda: remote_check(teacher, tokenizer, files, args, root)
        )
    write_table(objective, untrained, routing, remote, args, root, {"total": time.perf_counter() - start})


if __name__ == "__main__":
    main()
