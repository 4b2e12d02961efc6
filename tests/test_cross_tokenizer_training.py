"""Cross-tokenizer LM distillation wired end to end: the student's BPE tokenizer, aligned data, the
ULD / GOLD training loss against independent references, the module off- and on-policy, the configs."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import nn

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.aligned import AlignedEncoder, row_spans
from kd_lightning.llm.bpe import train_bpe_tokenizer
from kd_lightning.llm.cross_token_loss import CrossTokenizerLoss, position_pairs
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import IGNORE_INDEX
from kd_lightning.llm.vocab_mapping import VocabMapping
from kd_lightning.methods.lm import LMMethod, OnPolicy, TokenKD
from kd_lightning.recipes.llm_components import pair_tokenizers
from tests.conftest import tiny_trainer
from tests.test_cli import run
from tests.test_llm_module import changed, fit, snapshot

CORPUS = {"instructions": 40, "arithmetic": 200}
EXAMPLES = [
    ("What is 3 plus 4?", "The answer is 7."),
    ("Write one sentence about the ocean.", "The ocean is deep, dark-blue and vast!"),
    ("Describe autumn.", "Leaves  fall\nslowly."),
]


@pytest.fixture(scope="module")
def student_tokenizer():
    return train_bpe_tokenizer(vocab_size=400, num_prompts=CORPUS)


@pytest.fixture(scope="module")
def teacher_tokenizer():
    return char_tokenizer()


# ------------------------------------------------------------------------------------------- tokenizer
def test_bpe_tokenizer_is_deterministic_differs_from_the_teacher_and_encodes_any_text(
    student_tokenizer, teacher_tokenizer
) -> None:
    again = train_bpe_tokenizer(vocab_size=400, num_prompts=CORPUS)
    assert again.get_vocab() == student_tokenizer.get_vocab()
    assert 259 < len(student_tokenizer) <= 400
    assert student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    merged = [t for t in student_tokenizer.get_vocab() if len(t) > 1 and not t.startswith("<")]
    assert any(t.startswith("Ġ") for t in merged)  # learned multi-character pieces, byte-level spaces
    text = "Zebras ♥ naïve 42\nend"  # characters the corpus never saw still encode (bytes)
    ids = student_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert student_tokenizer.decode(ids) == text
    chat = student_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ConfigError, match="vocab_size"):
        train_bpe_tokenizer(vocab_size=100)


# ---------------------------------------------------------------------------------------- aligned data
def test_aligned_batches_pair_spans_that_spell_the_same_text(student_tokenizer, teacher_tokenizer) -> None:
    encoder = AlignedEncoder(student_tokenizer, teacher_tokenizer, max_length=200, system_prompt=None)
    batch = encoder.collate([encoder.encode(prompt, completion) for prompt, completion in EXAMPLES])
    assert batch["prompt_text"] == [prompt for prompt, _ in EXAMPLES]
    for row, (_, completion) in enumerate(EXAMPLES):
        spans = row_spans(batch["student_spans"][row], batch["teacher_spans"][row])
        student_text = [student_tokenizer.decode(batch["input_ids"][row, list(s)]) for s, _ in spans]
        teacher_text = [teacher_tokenizer.decode(batch["teacher_input_ids"][row, list(t)]) for _, t in spans]
        assert student_text == teacher_text
        assert "".join(student_text) == completion + "<|im_end|>"  # every character once, EOS last
        # spans cover exactly the labelled tokens of each side
        labelled = (batch["labels"][row] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert [i for s, _ in spans for i in s] == labelled
        teacher_labelled = (batch["teacher_labels"][row] != IGNORE_INDEX).nonzero().squeeze(1).tolist()
        assert [i for _, t in spans for i in t] == teacher_labelled
    assert any(len(s) > 1 or len(t) > 1 for s, t in spans)  # the tokenizations differ


def test_cut_completions_keep_only_spans_both_sides_hold_whole(student_tokenizer, teacher_tokenizer) -> None:
    prompt, completion = EXAMPLES[1]
    full = AlignedEncoder(student_tokenizer, teacher_tokenizer, 200, None).encode(prompt, completion)
    cut = AlignedEncoder(student_tokenizer, teacher_tokenizer, len(full["teacher_prompt"]) + 10, None)
    example = cut.encode(prompt, completion)
    assert len(example["teacher_completion"]) == 10 and 0 < len(example["spans"]) < len(full["spans"])
    assert example["spans"] == full["spans"][: len(example["spans"])]
    assert all(s_stop <= len(example["completion"]) and t_stop <= 10 for _, s_stop, _, t_stop in example["spans"])
    unfinished = cut.encode(prompt, "The answer", eos=False)
    assert student_tokenizer.eos_token_id not in unfinished["completion"]
    assert unfinished["spans"][-1][3] == len("The answer")  # no EOS span


# -------------------------------------------------------------------------------------------------- loss
def random_sides(seed: int, batch: int = 3, student_len: int = 9, teacher_len: int = 12):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(batch, student_len, 8, generator=generator, requires_grad=True)
    teacher_hidden = torch.randn(batch, teacher_len, 6, generator=generator)
    student_head, teacher_head = nn.Linear(8, 11, bias=False), nn.Linear(6, 17, bias=True)
    labels = torch.full((batch, student_len), IGNORE_INDEX)
    teacher_labels = torch.full((batch, teacher_len), IGNORE_INDEX)
    for row, (s_start, s_end, t_start, t_end) in enumerate([(2, 9, 3, 8), (4, 7, 1, 12), (1, 5, 2, 6)]):
        labels[row, s_start:s_end] = torch.randint(0, 11, (s_end - s_start,), generator=generator)
        teacher_labels[row, t_start:t_end] = torch.randint(0, 17, (t_end - t_start,), generator=generator)
    return student_hidden, student_head, labels, teacher_hidden, teacher_head, teacher_labels


def test_uld_training_loss_matches_the_sorted_probability_formula() -> None:
    student_hidden, student_head, labels, teacher_hidden, teacher_head, teacher_labels = random_sides(0)
    loss = CrossTokenizerLoss(alpha=1.0, alignment="position", temperature=2.0)
    out = loss(student_hidden, student_head, labels, teacher_hidden, teacher_head, teacher_labels)
    expected, pairs = 0.0, 0
    for row in range(labels.shape[0]):
        # row j predicts token j + 1: the rows before each labelled token, in order, on each side
        s_rows = [j - 1 for j in range(1, labels.shape[1]) if labels[row, j] != IGNORE_INDEX]
        t_rows = [j - 1 for j in range(1, teacher_labels.shape[1]) if teacher_labels[row, j] != IGNORE_INDEX]
        for s, t in zip(s_rows, t_rows, strict=False):  # up to the shorter completion
            p_s = sorted(torch.softmax(student_head(student_hidden[row, s]) / 2.0, -1).tolist(), reverse=True)
            p_t = sorted(torch.softmax(teacher_head(teacher_hidden[row, t]) / 2.0, -1).tolist(), reverse=True)
            p_s += [0.0] * (len(p_t) - len(p_s))
            expected += sum(abs(a - b) for a, b in zip(p_s, p_t, strict=True))
            pairs += 1
    assert pairs == 5 + 3 + 4  # the shorter completion of each row
    assert out.total.item() == pytest.approx(expected, rel=1e-5)
    assert out.count.item() == int((F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX) != IGNORE_INDEX).sum())
    assert position_pairs(labels, teacher_labels)[0].numel() == pairs
    out.total.backward()
    assert student_hidden.grad.abs().sum() > 0 and teacher_head.weight.grad is None


def test_gold_training_loss_with_one_tokenizer_is_the_forward_kl(teacher_tokenizer) -> None:
    """One tokenizer for both: every span is one token, every token shared, so GOLD must equal T^2 KL(p_t || p_s)
    summed over the completion tokens, as the same-vocabulary token loss computes it."""
    encoder = AlignedEncoder(teacher_tokenizer, teacher_tokenizer, 200, None)
    batch = encoder.collate([encoder.encode(prompt, completion) for prompt, completion in EXAMPLES])
    assert torch.equal(batch["input_ids"], batch["teacher_input_ids"])
    student, teacher = random_llama(vocab_size=99, seed=1), random_llama(vocab_size=99, seed=0)
    with torch.no_grad():
        student_hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        teacher_hidden = teacher.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
    gold = CrossTokenizerLoss(alpha=1.0, alignment="spans", temperature=1.5)
    gold.bind(VocabMapping.from_tokenizers(teacher_tokenizer, teacher_tokenizer, 99, 99))
    out = gold(
        student_hidden,
        student.lm_head,
        batch["labels"],
        teacher_hidden,
        teacher.lm_head,
        batch["teacher_labels"],
        batch["student_spans"],
        batch["teacher_spans"],
    )
    reference = TokenDistillationLoss(ForwardKL(temperature=1.5), alpha=1.0, chunk_size=None)
    expected = reference(student_hidden, student.lm_head, batch["labels"], teacher_hidden, teacher.lm_head)
    assert out.total.item() == pytest.approx(expected.total.item(), rel=1e-4)
    assert out.count == expected.count


def test_gold_needs_its_vocabulary_mapping() -> None:
    student_hidden, student_head, labels, teacher_hidden, teacher_head, teacher_labels = random_sides(1)
    spans = torch.full_like(labels, -1)
    with pytest.raises(ConfigError, match="bind"):
        CrossTokenizerLoss(alpha=0.5)(
            student_hidden,
            student_head,
            labels,
            teacher_hidden,
            teacher_head,
            teacher_labels,
            spans,
            torch.full_like(teacher_labels, -1),
        )


# ------------------------------------------------------------------------------------------------ module
def cross_setup(student_tokenizer, teacher_tokenizer, loss: str, **data):
    """``loss`` names an llm/loss config; ``sft``: llm/method=sft, which reads no loss."""
    teacher = random_llama(vocab_size=128, seed=0)
    student = random_llama(tokenizer=student_tokenizer, hidden_size=32, num_layers=1, seed=1)
    built = None
    if loss != "sft":
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            built = instantiate(compose("llm_distill", overrides=[f"llm/loss={loss}"]).llm.loss)
    pairing = pair_tokenizers(built, teacher, student, teacher_tokenizer, student_tokenizer)
    datamodule = LLMDataModule(
        **pairing.data,
        train_prompts={"kind": "arithmetic", "num_prompts": 16, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 4, "seed": 0, "split": "heldout"},
        batch_size=4,
        **data,
    )
    return teacher, student, built, pairing, datamodule


@pytest.mark.parametrize("lmbda", [0.0, 1.0], ids=["off_policy", "on_policy"])
def test_module_distils_across_tokenizers(student_tokenizer, teacher_tokenizer, tmp_path: Path, lmbda) -> None:
    teacher, student, loss, _, datamodule = cross_setup(
        student_tokenizer, teacher_tokenizer, "gold", prompt_only=lmbda == 1.0
    )
    assert loss.mapping is not None and loss.mapping.student_size == len(student_tokenizer)
    common = {"student": student, "loss": loss, "optimizer": functools.partial(torch.optim.AdamW, lr=1e-2)}
    sampling = {"lmbda": lmbda, "generation": {"max_new_tokens": 6}, "aligned": datamodule.encoder}
    sampling |= {"pad_token_id": student_tokenizer.pad_token_id, "eos_token_id": student_tokenizer.eos_token_id}
    module = OnPolicy(**common, teacher=teacher, **sampling) if lmbda else TokenKD(**common, teacher=teacher)
    calls = []
    if lmbda:  # the student's samples, re-encoded for both tokenizers, are what the loss sees
        realign = module.realign
        module.realign = lambda *args: calls.append(realign(*args)) or calls[-1]
    before_student, before_teacher = snapshot(student), snapshot(teacher)
    trainer = fit(module, datamodule, tmp_path, max_steps=2)
    assert changed(before_student, student) and not changed(before_teacher, teacher)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert trainer.callback_metrics["train/loss_distill"] > 0
    if lmbda:
        assert len(calls) == 2
        batch = calls[0]
        eos = student_tokenizer.eos_token_id
        for row in range(batch["input_ids"].shape[0]):
            spans = row_spans(batch["student_spans"][row], batch["teacher_spans"][row])
            student_ids = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
            teacher_ids = batch["teacher_labels"][row][batch["teacher_labels"][row] != IGNORE_INDEX].tolist()
            finished = student_ids[-1] == eos
            text = student_tokenizer.decode(student_ids[:-1] if finished else student_ids)
            # the teacher side encodes the text of the student's sample, EOS only where the sample ended
            expected = teacher_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert teacher_ids == expected + ([teacher_tokenizer.eos_token_id] if finished else [])
            assert spans and spans[-1][0].stop <= len(batch["labels"][row])
    metrics = validate(module, datamodule)
    assert "val/kl_to_teacher" not in metrics and metrics["val/loss"] > 0


def validate(module: LMMethod, datamodule: LLMDataModule) -> dict:
    return tiny_trainer(enable_checkpointing=True).validate(module, datamodule=datamodule, verbose=False)[0]


def test_pairing_refuses_same_vocabulary_losses_and_keeps_the_teacher_out_of_sft(
    student_tokenizer, teacher_tokenizer
) -> None:
    with pytest.raises(ConfigError, match="llm/loss=uld or llm/loss=gold"):
        cross_setup(student_tokenizer, teacher_tokenizer, "forward_kl")
    *_, pairing, datamodule = cross_setup(student_tokenizer, teacher_tokenizer, "sft")
    assert not pairing.teacher_reads_student and datamodule.tokenizer is student_tokenizer
    assert "teacher_input_ids" not in next(iter(datamodule.train_dataloader()))


@pytest.mark.parametrize(("loss", "alignment"), [("uld", "position"), ("gold", "spans")])
def test_cross_tokenizer_loss_configs_build(loss: str, alignment: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        built = instantiate(compose("llm_distill", overrides=[f"llm/loss={loss}"]).llm.loss)
    assert isinstance(built, CrossTokenizerLoss) and built.alignment_kind == alignment and built.alpha == 0.5


def test_kd_llm_distill_runs_a_student_with_its_own_tokenizer(kd_home: Path) -> None:
    run_dir = kd_home / "llm_cli" / "gold"
    tiny = [
        "llm.student.hidden_size=32",
        "llm.student.intermediate_size=64",
        "llm.student.num_layers=1",
        "llm.student.tokenizer.vocab_size=300",
    ]
    result = run(
        "kd-llm-distill",
        "llm/teacher=tiny",
        "llm/student=bpe_llama",
        *tiny,
        "llm/loss=gold",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val/loss"] > 0 and summary["student_params"] < summary["teacher_params"] * 10
