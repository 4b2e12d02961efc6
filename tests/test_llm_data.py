"""Prompt generators, the answer verifier and the prompt / completion datamodule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.models import char_tokenizer
from kd_lightning.llm.prompts import (
    KINDS,
    extract_answer,
    has_answer_line,
    is_correct,
    make_prompts,
    split_of,
    written_steps,
)
from kd_lightning.llm.tokens import IGNORE_INDEX
from tests.conftest import compose_config

ARITHMETIC = {"kind": "arithmetic", "num_prompts": 6, "seed": 0}
HELDOUT = {"kind": "arithmetic", "num_prompts": 4, "seed": 0, "split": "heldout"}


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_are_deterministic_per_seed_and_splits_disjoint(kind: str) -> None:
    first = make_prompts(kind, 40, seed=0)
    assert first == make_prompts(kind, 40, seed=0)
    assert first != make_prompts(kind, 40, seed=1)
    assert len({p.id for p in first}) == 40
    heldout = make_prompts(kind, 40, seed=0, split="heldout")
    assert not {p.text for p in first} & {p.text for p in heldout}
    assert all(split_of(p.text) == "heldout" for p in heldout)
    assert not {p.text for p in make_prompts(kind, 40, seed=5)} & {p.text for p in heldout}


def test_arithmetic_answers_are_right() -> None:
    for prompt in make_prompts("arithmetic", 60, seed=3):
        a, b = (int(word) for word in prompt.text.replace(".", " ").split() if word.isdigit())
        verb = next(verb for verb in ("gets", "gives", "buys") if f" {verb} " in prompt.text)
        assert prompt.answer == {"gets": a + b, "gives": a - b, "buys": a * b}[verb]


def test_prompt_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"prompts\.kind='poems'"):
        make_prompts("poems", 3, seed=0)
    with pytest.raises(ConfigError, match=r"prompts\.num_prompts=1000: only \d+ distinct instructions"):
        make_prompts("instructions", 1000, seed=0)


@pytest.mark.parametrize(
    ("completion", "answer"),
    [
        ("3 + 4 = 7. The answer is 7.", 7),
        ("First 12, then 30. The answer: **1,250**", 1250),
        ("Tom has 5 left, the answer is -2 after all", -2),
        ("He has 8 apples and 3 pears, so 11", 11),
        ("I don't know.", None),
    ],
)
def test_extract_answer(completion: str, answer: int | None) -> None:
    assert extract_answer(completion) == answer


def test_is_correct_checks_the_final_answer_only() -> None:
    assert is_correct("14 - 3 = 11. The answer is 11.", 11)
    assert not is_correct("The answer is 11. Wait, the answer is 12.", 11)


def test_strict_verification_needs_the_answer_line() -> None:
    assert extract_answer("He has 8 apples and 3 pears, so 11", strict=True) is None
    assert extract_answer("12 + 1 = 13. The answer: **1,250**", strict=True) == 1250
    assert is_correct("1. 1. 1.", 1) and not is_correct("1. 1. 1.", 1, strict=True)
    assert has_answer_line("So the answer is 3.") and not has_answer_line("so 3")


def test_written_steps_are_checked_one_by_one() -> None:
    lucky = "6 + 12 = 28. 2 bags of 4 is 2 * 4 = 8. 28 + 8 = 36. 36 - 13 = 13. The answer is 13."
    assert is_correct(lucky, 13)  # the outcome verifier accepts it...
    assert written_steps(lucky) == [("+", False), ("*", True), ("+", True), ("-", False)]  # ...two steps are wrong
    assert written_steps("The answer is 13.") == []
    for prompt in make_prompts("multistep", 20, seed=0):
        assert written_steps(prompt.solution) and all(right for _, right in written_steps(prompt.solution))


def test_batches_mask_prompt_and_padding() -> None:
    tokenizer = char_tokenizer()
    data = LLMDataModule(tokenizer, train_prompts=ARITHMETIC, val_prompts=HELDOUT, batch_size=3, max_length=200)
    batch = next(iter(data.val_dataloader()))
    keys = {"input_ids", "attention_mask", "labels", "prompt_input_ids", "prompt_attention_mask", "token_source"}
    assert set(batch) == keys and batch["token_source"] == "ground_truth"
    for row in range(3):
        mask, labels = batch["attention_mask"][row].bool(), batch["labels"][row]
        prompt = batch["prompt_input_ids"][row][batch["prompt_attention_mask"][row].bool()]
        assert torch.equal(batch["input_ids"][row][: len(prompt)], prompt)  # right padding, same prompt ids
        assert (labels[: len(prompt)] == IGNORE_INDEX).all() and (labels[~mask] == IGNORE_INDEX).all()
        completion = labels[labels != IGNORE_INDEX]
        assert torch.equal(completion, batch["input_ids"][row][len(prompt) : int(mask.sum())])
        assert tokenizer.decode(completion).startswith("The answer is ") and completion[-1] == tokenizer.eos_token_id
    assert (batch["prompt_attention_mask"][:, -1] == 1).all()  # prompts padded on the left


def test_completions_from_a_file_and_rejection_filter(tmp_path: Path) -> None:
    records = [
        {"prompt": "What is 2 + 3?", "completion": "The answer is 5.", "correct": True},
        {"prompt": "What is 2 + 2?", "completion": "The answer is 5.", "correct": False},
        {"prompt": "Say hi.", "completion": "Hi!", "correct": None},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    tokenizer = char_tokenizer()
    data = LLMDataModule(tokenizer, train_file=str(path), val_file=str(path), only_correct=True, batch_size=8)
    data.setup()
    texts = [tokenizer.decode(example["completion"], skip_special_tokens=True) for example in data.splits["train"]]
    assert texts == ["The answer is 5.", "Hi!"] and data.tokenizer is tokenizer


def test_length_budget_keeps_the_shortest_verified_trace_per_problem(tmp_path: Path) -> None:
    records = [
        {"id": "a", "prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. So the answer is 5.", "correct": True},
        {"id": "a", "prompt": "What is 2 + 3?", "completion": "The answer is 4.", "correct": False},  # shorter, wrong
        {"id": "a", "prompt": "What is 2 + 3?", "completion": "2 + 3 = 5. The answer is 5.", "correct": True},
        {"id": "b", "prompt": "What is 2 + 2?", "completion": "The answer is 4.", "correct": True},
    ]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    tokenizer = char_tokenizer()
    data = LLMDataModule(tokenizer, train_file=str(path), val_file=str(path), only_correct=True, shortest=True)
    data.setup()
    texts = [tokenizer.decode(example["completion"], skip_special_tokens=True) for example in data.splits["train"]]
    assert texts == ["2 + 3 = 5. The answer is 5.", "The answer is 4."]
    assert len(data.splits["val"]) == 3  # validation keeps every verified trace


def test_prompt_only_batches_for_on_policy_training() -> None:
    data = LLMDataModule(
        char_tokenizer(), train_prompts={**ARITHMETIC, "kind": "mixed"}, val_prompts=HELDOUT, prompt_only=True
    )
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"prompt_input_ids", "prompt_attention_mask", "token_source"}
    assert "labels" in next(iter(data.val_dataloader()))


def test_long_completions_are_cut_and_long_prompts_fail() -> None:
    data = LLMDataModule(char_tokenizer(), train_prompts=ARITHMETIC, val_prompts=HELDOUT, max_length=150)
    data.setup()
    assert all(len(e["prompt"]) + len(e["completion"]) <= 150 for e in data.splits["train"])
    assert any(e["completion"][-1] != data.tokenizer.eos_token_id for e in data.splits["train"])  # one was cut
    with pytest.raises(ConfigError, match=r"no room for a completion within llm\.data\.max_length=50"):
        LLMDataModule(char_tokenizer(), train_prompts=ARITHMETIC, val_prompts=HELDOUT, max_length=50).setup()


def test_data_errors_name_the_keys(tmp_path: Path) -> None:
    tokenizer = char_tokenizer()
    with pytest.raises(ConfigError, match=r"llm\.data\.train_file=.*kd-llm-generate"):
        LLMDataModule(tokenizer, train_file=str(tmp_path / "none.jsonl"), val_prompts=HELDOUT).setup()
    with pytest.raises(ConfigError, match=r"llm\.data\.train_prompts\.kind=instructions has no reference"):
        LLMDataModule(tokenizer, train_prompts={**ARITHMETIC, "kind": "instructions"}, val_prompts=HELDOUT).setup()


@pytest.mark.parametrize("option", ["arithmetic", "prompts", "teacher_text"])
def test_data_configs_compose_and_build(option: str, tmp_path: Path, kd_home: Path) -> None:
    cfg = compose_config(tmp_path, [f"llm/data={option}"], config_name="llm_distill")
    data = instantiate(cfg.llm.data, tokenizer=char_tokenizer())
    assert isinstance(data, LLMDataModule) and data.prompt_only == (option == "prompts")
    if option == "arithmetic":
        data.setup()
        assert len(data.splits["train"]) == cfg.llm.data.train_prompts.num_prompts
    else:  # the teacher text files are kd-llm-generate's outputs for its documented commands
        train = compose_config(tmp_path, ["prompts.num_prompts=256"], config_name="llm_generate")
        heldout = compose_config(tmp_path, ["prompts.num_prompts=32", "prompts.split=heldout"], "llm_generate")
        assert cfg.llm.data.val_file == heldout.generate.out_file
        assert option == "prompts" or cfg.llm.data.train_file == train.generate.out_file


def test_multistep_solutions_are_right_step_by_step() -> None:
    import re

    for prompt in make_prompts("multistep", 60, seed=4):
        steps = re.findall(r"(\d+) ([+*-]) (\d+) = (\d+)", prompt.solution)
        assert len(steps) == 4  # three operations, buying bags takes two
        for a, op, b, c in steps:
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        assert steps[-1][3] == str(prompt.answer) and prompt.solution.endswith(f"The answer is {prompt.answer}.")
        assert is_correct(prompt.solution, prompt.answer) and prompt.answer >= 0
