"""DistiLLM-2's contrastive objective: skew KL on teacher responses + skew reverse KL on the student's own
responses (generated once, cached), against the divergences computed directly; module and CLI runs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.distillm2_loss import DistiLLM2Loss, student_responses
from kd_lightning.llm.generation import GenerationSettings
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.methods.lm import DistiLLM2
from tests.test_cli import run
from tests.test_llm_module import changed, fit, snapshot

SETTINGS = GenerationSettings(max_new_tokens=6, do_sample=True, seed=3)


def data_with_responses(student, tmp_path: Path) -> LLMDataModule:
    data = LLMDataModule(
        char_tokenizer(),
        train_prompts={"kind": "arithmetic", "num_prompts": 6, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 3, "seed": 0, "split": "heldout"},
        batch_size=3,
    )
    data.setup()
    data.add_student_responses(student_responses(student, char_tokenizer(), data.prompts["train"], SETTINGS, tmp_path))
    return data


def skew_mixture_kl(log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    """KL(p || beta p + (1 - beta) q) per row, from probabilities (the papers' definition)."""
    p, q = log_p.exp(), log_q.exp()
    return (p * (log_p - torch.log(beta * p + (1 - beta) * q))).sum(-1)


def test_loss_is_skew_kl_on_teacher_responses_plus_skew_reverse_kl_on_student_responses(tmp_path: Path) -> None:
    teacher, student = random_llama(vocab_size=99, seed=0), random_llama(vocab_size=99, seed=1)
    batch = next(iter(data_with_responses(student, tmp_path).train_dataloader()))
    assert {"sampled_input_ids", "sampled_labels"} <= set(batch)
    assert not torch.equal(batch["sampled_labels"], batch["labels"])
    loss = DistiLLM2Loss(skew=0.2, student_weight=0.5, chunk_size=4)
    module = DistiLLM2(student=student, loss=loss, optimizer=torch.optim.SGD, teacher=teacher)
    module.train()
    out = module.loss_on(batch)
    expected, tokens = 0.0, 0
    for prefix, weight, teacher_first in (("", 1.0, True), ("sampled_", 0.5, False)):
        ids, mask, labels = (batch[f"{prefix}{key}"] for key in ("input_ids", "attention_mask", "labels"))
        valid = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX
        with torch.no_grad():
            log_t = F.log_softmax(teacher(input_ids=ids, attention_mask=mask).logits[valid], -1)
        log_s = F.log_softmax(student(input_ids=ids, attention_mask=mask).logits[valid], -1)
        pair = (log_t, log_s) if teacher_first else (log_s, log_t)  # SKL on teacher text, SRKL on student text
        expected = expected + weight * skew_mixture_kl(*pair, 0.2).sum()
        tokens += int(valid.sum())
    assert out.total.item() == pytest.approx(float(expected), rel=1e-4) and out.count == tokens
    assert out.parts["distill/teacher_responses"] + out.parts["distill/student_responses"] == pytest.approx(
        out.parts["distill"].item()
    )


def test_student_responses_are_generated_once_per_student(tmp_path: Path) -> None:
    student = random_llama(vocab_size=99, seed=1)
    calls = []
    generate = student.generate
    student.generate = lambda *a, **k: calls.append(1) or generate(*a, **k)
    prompts = ["What is 2 plus 3?", "What is 4 times 2?", "What is 2 plus 3?"]
    first = student_responses(student, char_tokenizer(), prompts, SETTINGS, tmp_path)
    again = student_responses(student, char_tokenizer(), prompts, SETTINGS, tmp_path)
    assert (
        first == again and set(first) == set(prompts) and len(calls) == 1 and len(list(tmp_path.glob("*.jsonl"))) == 1
    )
    student_responses(random_llama(vocab_size=99, seed=2), char_tokenizer(), prompts, SETTINGS, tmp_path)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # another student: its own responses


def test_module_trains_on_both_sides_and_validates_on_teacher_text(tmp_path: Path) -> None:
    teacher, student = random_llama(vocab_size=99, seed=0), random_llama(vocab_size=99, seed=1)
    module = DistiLLM2(
        student=student, loss=DistiLLM2Loss(), teacher=teacher, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    before = snapshot(student)
    trainer = fit(module, data_with_responses(student, tmp_path), tmp_path, max_steps=2)
    metrics = trainer.callback_metrics
    assert changed(before, student)
    assert metrics["train/loss_distill/student_responses"] > 0 and metrics["train/loss_distill/teacher_responses"] > 0
    assert metrics["val/kl_to_teacher"] > 0


def test_kd_llm_distill_distillm2(kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / "distillm2"
    common = [
        "llm/teacher=tiny",
        "llm/student=tiny",
        "llm/method=distillm2",
        "llm.method.generation.max_new_tokens=6",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
    ]
    cache = kd_home / "cache" / "distillm2"
    before = set(cache.glob("*.jsonl"))  # other tests' runs in this session's home (any order, any worker)
    result = run("kd-llm-distill", *common, f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"]["val/loss"] > 0
    assert len(set(cache.glob("*.jsonl")) - before) == 1  # this run cached its student's responses once
    result = run("kd-llm-distill", *common, "llm/teacher_cache=top_k", f"hydra.run.dir={run_dir}_bad", home=kd_home)
    assert result.returncode == 2 and "llm/teacher_cache=none" in result.stderr
