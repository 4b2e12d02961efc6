"""Sequence packing (llm.data.packing) vs padded batches: padding fraction and training tokens/s.

    OMP_NUM_THREADS=1 python scripts/bench/llm_packing.py                # writes docs/results/llm_packing.md
    OMP_NUM_THREADS=1 python scripts/bench/llm_packing.py --steps 2 --warmup 1 --out /tmp/llm_packing.md  # smoke

Data: prompts of ``make_prompts(kind="mixed")`` (instructions and arithmetic problems, chat-formatted) with
generated completions of log-normally distributed length (words drawn from the prompts' vocabulary, median
--median-words words), a realistic mix of short and long examples; each variant reads the same batches of
--batch examples in the same order. Models: the tiny random Llamas of ``llm/teacher=tiny`` and
``llm/student=tiny`` (character tokenizer), one CPU thread; TokenKD with forward KL and a live teacher,
AdamW steps. Padding fraction = 1 - attended tokens / (rows x width) of the student's batches; tokens/s =
labelled (distilled) tokens of the timed steps / their wall time, after --warmup steps. Rows longer than
max_length (--pack-length) hold more examples but cost attention quadratic in the row's length (the mask is
dense: sdpa / eager compute every query-key pair of a row, masked or not).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from kd_step import provenance

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.prompts import make_prompts
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.methods.lm import TokenKD

REPO = Path(__file__).resolve().parents[2]


def write_examples(path: Path, count: int, median_words: int, seed: int) -> None:
    """``count`` prompt / completion records with log-normal completion lengths (generated text)."""
    rng = np.random.default_rng(seed)
    prompts = [prompt.text for prompt in make_prompts("mixed", count, seed)]
    words = sorted({word for text in prompts for word in text.split()})
    lengths = np.maximum(1, rng.lognormal(np.log(median_words), 0.8, count).astype(int))
    with path.open("w") as file:
        for prompt, length in zip(prompts, lengths, strict=True):
            completion = " ".join(rng.choice(words, length))
            file.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def models():
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("llm_distill", overrides=["llm/teacher=tiny", "llm/student=tiny", "llm/loss=forward_kl"])
    teacher = instantiate(cfg.llm.teacher.model)
    tokenizer = instantiate(cfg.llm.teacher.tokenizer)
    student_cfg = {key: value for key, value in cfg.llm.student.items() if key != "gradient_checkpointing"}
    student = instantiate(student_cfg, teacher=teacher)
    return teacher, student, tokenizer, instantiate(cfg.llm.loss)


def measure(args: argparse.Namespace, file: Path, packing: bool) -> dict[str, float]:
    """Padding fraction, rows per batch and labelled tokens/s of one variant."""
    teacher, student, tokenizer, loss = models()
    data = LLMDataModule(
        tokenizer,
        train_file=str(file),
        val_file=str(file),
        max_length=args.max_length,
        batch_size=args.batch,
        system_prompt="Be brief.",
        packing=packing,
        pack_length=args.pack_length if packing else None,
    )
    data.setup()
    examples = data.splits["train"]
    batches = [data.collate(examples[i : i + args.batch]) for i in range(0, args.steps * args.batch, args.batch)]
    module = TokenKD(student=student, teacher=teacher, loss=loss, optimizer=torch.optim.AdamW)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    tokens = attended = cells = rows = 0
    elapsed = 0.0
    for step, batch in enumerate(batches):
        start = time.perf_counter()
        out = module.one_loss(module.loss, batch, monitor_kl=False)
        (out.total / out.count.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        attended += int(batch["attention_mask"].sum())
        cells += batch["attention_mask"].numel()
        rows += batch["input_ids"].shape[0]
    return {
        "padding": 1 - attended / cells,
        "rows": rows / len(batches),
        "width": cells / rows,
        "tokens_per_s": tokens / max(elapsed, 1e-9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="examples per step (both variants)")
    parser.add_argument("--steps", type=int, default=24, help="steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512, help="llm.data.max_length")
    parser.add_argument("--pack-length", type=int, default=None, help="llm.data.pack_length (default: max_length)")
    parser.add_argument("--median-words", type=int, default=24, help="median completion length in words")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results" / "llm_packing.md")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "generated.jsonl"
        write_examples(file, args.steps * args.batch, args.median_words, args.seed)
        cells = {name: measure(args, file, name == "packed") for name in ("padded", "packed")}
    command = " ".join(["python scripts/bench/llm_packing.py", *sys.argv[1:]])
    lines = [
        "# Sequence packing (llm.data.packing)",
        "",
        f"Command: `{command}` (with OMP_NUM_THREADS=1; {provenance()}).",
        "",
        f"Tiny random Llamas (llm/teacher=tiny, llm/student=tiny), TokenKD forward KL with a live teacher; "
        f"{args.batch} examples per step (mixed prompts, generated completions, median {args.median_words} words), "
        f"max_length {args.max_length}, pack_length {args.pack_length or args.max_length}; "
        f"{args.steps - args.warmup} timed steps after {args.warmup}; {platform.processor() or 'cpu'}, 1 thread, "
        f"torch {torch.__version__}.",
        "",
        "| batches | padding fraction | rows per step | row width (tokens) | labelled tokens/s |",
        "|---|---|---|---|---|",
    ]
    for name, cell in cells.items():
        lines.append(
            f"| {name} | {cell['padding']:.3f} | {cell['rows']:.1f} | {cell['width']:.0f} | "
            f"{cell['tokens_per_s']:,.0f} |"
        )
    lines += ["", f"packed / padded tokens/s: {cells['packed']['tokens_per_s'] / cells['padded']['tokens_per_s']:.2f}"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
