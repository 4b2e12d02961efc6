"""Cross-tokenizer distillation demo on 2 CPU cores: SmolLM2-135M-Instruct -> a small Llama with its own tokenizer.

    python experiments/llm_cross_tokenizer.py --seeds 0 1 2   # writes its section of docs/results/llm.md

The student (conf/llm/student/bpe_llama.yaml) is a randomly initialised 4-layer Llama whose byte-level BPE
tokenizer is trained here on the project's prompt corpus, so its vocabulary differs from the teacher's
(49,152 tokens). It is trained on the teacher's greedy completions of templated instructions three ways,
each composed from the kd-llm-distill configs and built by the recipe's own functions:

- ``sft``: cross-entropy on the teacher text only (black-box sequence-level KD, the baseline);
- ``uld``: + Universal Logit Distillation (llm/loss=uld, position alignment);
- ``gold``: + GOLD-style span-aligned loss (llm/loss=gold: shared tokens by generalised KL, ULD on the rest);
- ``gold_shared``: the same without the ULD term on unmatched tokens (``llm.loss.unmatched_weight=0``).

Held-out metric: the student's cross-entropy on the teacher's completions of held-out instructions, in nats
per character of completion text (tokenizer-free, so the teacher's own value on the same text is a reference)
and as perplexity per student token. Finished runs are kept under $KD_LIGHTNING_HOME/runs/llm_cross_tokenizer.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from llm_common import (
    RESULTS,
    RESULTS_TITLE,
    adamw,
    finished,
    kd_home,
    llm_config,
    mean_std,
    run_key,
    software_summary,
    timed_fit,
    validate,
)
from torch import nn

from kd_lightning.engine.instantiate import parameter_count
from kd_lightning.engine.weights import freeze
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.generation import GenerationSettings, generate_file
from kd_lightning.llm.models import load_gguf_model, load_gguf_tokenizer
from kd_lightning.llm.prompts import make_prompts
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.recipes.llm_components import build_student, offer, pair_tokenizers, scheme_factory
from kd_lightning.reporting.markdown import write_section

SECTION = "llm-cross-tokenizer"
#: arguments that do not change a run's result
IGNORED_ARGS = ("seeds", "runs", "out", "threads")

#: name -> (kd-llm-distill overrides, description)
RUNS = {
    "sft": (["llm/method=sft"], "CE on teacher text (black-box baseline)"),
    "uld": (["llm/loss=uld"], "CE + ULD (position-aligned sorted probabilities)"),
    "gold": (["llm/loss=gold"], "CE + GOLD (span-aligned; KL on shared tokens, ULD on the rest)"),
    "gold_shared": (["llm/loss=gold", "llm.loss.unmatched_weight=0"], "CE + GOLD, shared tokens only (no ULD term)"),
}


def teacher_text(teacher, tokenizer, args: argparse.Namespace, data_dir: Path) -> dict[str, Path]:
    """Greedy teacher completions of training and held-out instructions (generated once, cached)."""
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    files = {}
    for split, count in (("train", args.train_prompts), ("heldout", args.heldout_prompts)):
        files[split] = data_dir / f"instructions_{split}_{count}_{args.max_new_tokens}tok.jsonl"
        prompts = make_prompts("instructions", count, 0, split)
        report = generate_file(teacher, tokenizer, prompts, files[split], settings, batch_size=16, progress=False)
        print(f"teacher text {split}: {report}", flush=True)
    return files


@torch.no_grad()
def nats_per_char(model: nn.Module, datamodule: LLMDataModule) -> float:
    """Summed next-token cross-entropy of ``model`` over the validation completions (EOS included) per
    character of completion text (+1 per EOS; completions are not cut at the demo's lengths)."""
    tokenizer = datamodule.tokenizer
    nats, chars = 0.0, 0
    model.eval()
    for batch in datamodule.val_dataloader():
        ids, mask, labels = (batch[key] for key in ("input_ids", "attention_mask", "labels"))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        targets = labels[:, 1:]
        nats += float(nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum"))
        for row in targets:
            tokens = row[row != IGNORE_INDEX].tolist()
            chars += len(tokenizer.decode(tokens[:-1])) + 1
    return nats / chars


def run_one(name: str, seed: int, teacher, tokenizer, files: dict, args: argparse.Namespace) -> dict:
    """Train one student; returns its held-out metrics and timing."""
    overrides = ["llm/student=bpe_llama", f"seed={seed}", *RUNS[name][0]]
    cfg = llm_config(overrides)
    L.seed_everything(seed, workers=True)
    factory, loss_cfg = scheme_factory(cfg)
    loss = instantiate(loss_cfg) if loss_cfg is not None else None
    student, student_tokenizer = build_student(cfg.llm.student, teacher, tokenizer)
    pairing = pair_tokenizers(loss, teacher, student, tokenizer, student_tokenizer)
    data = {"train_file": str(files["train"]), "val_file": str(files["heldout"]), "max_length": args.max_length}
    datamodule = LLMDataModule(**pairing.data, **data, batch_size=args.batch_size, val_batch_size=16)
    module = offer(
        factory,
        student=student,
        loss=loss,
        vocab_size=pairing.vocab_size,
        optimizer=adamw(args.lr),
        teacher=teacher if loss is not None or pairing.teacher_reads_student else None,
        pad_token_id=student_tokenizer.pad_token_id,
        eos_token_id=student_tokenizer.eos_token_id,
        seed=seed,
    )
    train_seconds = timed_fit(module, datamodule, args.steps)
    metrics = validate(module, datamodule)
    result = {
        "run": name,
        "seed": seed,
        "train_seconds": train_seconds,
        "ppl": metrics["val/ppl"],
        "nats_per_char": nats_per_char(student, datamodule),
        "student_params": parameter_count(student),
        "student_vocab": len(student_tokenizer),
        "shared_tokens": len(loss.mapping.shared) if getattr(loss, "mapping", None) else None,
    }
    print(json.dumps(result), flush=True)
    return result


def teacher_reference(teacher, tokenizer, files: dict, args: argparse.Namespace) -> float:
    """The teacher's own nats per character on the held-out completions."""
    datamodule = LLMDataModule(
        tokenizer,
        train_file=str(files["train"]),
        val_file=str(files["heldout"]),
        max_length=args.max_length,
        val_batch_size=16,
    )
    return nats_per_char(teacher, datamodule)


def write_table(results: list[dict], teacher_npc: float, args: argparse.Namespace, timing: dict) -> None:
    seeds = sorted({r["seed"] for r in results})
    first = results[0]
    shared = next((r["shared_tokens"] for r in results if r["shared_tokens"]), None)
    rows = [f"| teacher | SmolLM2-135M-Instruct on its own tokenisation (reference) | — | {teacher_npc:.3f} | — | — |"]
    for name, (_, description) in RUNS.items():
        runs = [r for r in results if r["run"] == name]
        if runs:
            nats, ppl = mean_std([r["nats_per_char"] for r in runs], 1.0, 3), mean_std([r["ppl"] for r in runs], 1.0, 2)
            seconds = mean_std([r["train_seconds"] for r in runs], 1.0, 0)
            rows.append(f"| {name} | {description} | {args.steps} | {nats} | {ppl} | {seconds} |")
    command = " ".join(["python experiments/llm_cross_tokenizer.py", *sys.argv[1:]])
    lines = [
        "<!-- written by experiments/llm_cross_tokenizer.py; do not edit by hand -->",
        "## Cross-tokenizer distillation: SmolLM2-135M-Instruct -> a Llama with its own BPE tokenizer (CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Student: `llm/student=bpe_llama`, a randomly initialised Llama ({first['student_params'] / 1e6:.2f} M "
        f"parameters) with a byte-level BPE tokenizer of {first['student_vocab']} tokens trained here on the "
        f"prompt corpus (the teacher has 49,152; {shared} normalised token strings are shared). Trained on the "
        f"teacher's greedy completions (at most {args.max_new_tokens} new tokens) of {args.train_prompts} "
        f"instructions with AdamW (lr {args.lr}, batch {args.batch_size}, {args.steps} steps, alpha 0.5 for the "
        f"distillation runs); mean ± std over seeds {seeds}.",
        "",
        f"Metric: cross-entropy on the teacher's completions of {args.heldout_prompts} held-out instructions, "
        "in **nats per character** (tokenizer-free: comparable with the teacher's own) and as **perplexity per "
        "student token** (one student tokenizer for all rows).",
        "",
        "| run | what | steps | nats/char ↓ | ppl ↓ | train time (s) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Timings ({args.threads} torch thread on 2 shared CPU cores, indicative): teacher load and data "
        f"{timing['setup']:.0f} s, this invocation {timing['total']:.0f} s (finished runs are reused). "
        + software_summary(results),
    ]
    text = "\n".join(lines)
    write_section(args.out, text, SECTION, title=RESULTS_TITLE)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--train-prompts", type=int, default=160)
    parser.add_argument("--heldout-prompts", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    home = kd_home()
    data_dir, out_dir = home / "data" / "llm_demo", home / "runs" / "llm_cross_tokenizer"
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher, tokenizer = freeze(load_gguf_model()), load_gguf_tokenizer()
    files = teacher_text(teacher, tokenizer, args, data_dir)
    teacher_npc = teacher_reference(teacher, tokenizer, files, args)
    timing = {"setup": time.perf_counter() - start}
    results = []
    for seed in args.seeds:
        for name in args.runs:
            done = out_dir / f"{run_key(name, seed, args, IGNORED_ARGS)}.json"
            results.append(finished(done, functools.partial(run_one, name, seed, teacher, tokenizer, files, args)))
    timing["total"] = time.perf_counter() - start
    write_table(results, teacher_npc, args, timing)


if __name__ == "__main__":
    main()
