"""kd-distill on text classification: local CSV files, Hugging Face sequence classifiers from configs, and a
teacher with a tokenizer of its own (``data.teacher_tokenizer`` + ``teacher.input: TokenInput``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from transformers import AutoTokenizer

from kd_lightning.engine.errors import ConfigError
from kd_lightning.recipes.distill import distill
from kd_lightning.teacher import Teacher
from tests.conftest import compose_config
from tests.text_fixtures import SENTENCES, bpe_tokenizer, rows, word_tokenizer, write_csv

QUIET = ["logger=none", "+trainer.enable_progress_bar=false", "compare_scratch=false"]
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("text")
    labels = [len(s.split()) > 3 for s in SENTENCES]  # long vs short sentences: learnable
    records = rows([int(v) for v in labels])
    files = {split: write_csv(root / f"{split}.csv", records) for split in ("train", "val", "test")}
    return {**files, "student_tok": word_tokenizer(root / "word"), "teacher_tok": bpe_tokenizer(root / "bpe")}


def overrides(data: dict[str, Path], *extra: str) -> list[str]:
    vocab = {name: len(AutoTokenizer.from_pretrained(str(data[f"{name}_tok"]))) for name in ("student", "teacher")}
    sizes = [
        f"{role}.model.config.{key}={value}" for role in ("teacher", "student") for key, value in TINY_BERT.items()
    ]
    sizes.append("teacher.model.config.num_hidden_layers=2")
    return [
        "data=text",
        f"data.train_file={data['train']}",
        f"data.val_file={data['val']}",
        f"data.test_file={data['test']}",
        f"data.tokenizer={data['student_tok']}",
        "data.batch_size=8",
        "teacher=hf_text",
        "student=hf_text",
        f"teacher.model.config.vocab_size={vocab['student']}",
        f"student.model.config.vocab_size={vocab['student']}",
        *sizes,
        "teacher.fit.max_epochs=2",
        "trainer.max_epochs=1",
        *QUIET,
        *extra,
    ]


def test_bert_style_teacher_to_smaller_student_on_csv(text_data: dict[str, Path], tmp_path: Path, kd_home) -> None:
    summary = distill(compose_config(tmp_path / "run", overrides(text_data, "teacher_cache=memory")))
    metrics = summary["metrics"]
    assert {"test/acc", "teacher/test_acc", "val/agreement", "train/loss_kd"} <= set(metrics)
    assert summary["student_params"] < summary["teacher_params"]
    # kd-report reads the text run too (token batches, not image tensors): the same test accuracy.
    from kd_lightning.recipes.report import report

    threads = torch.get_num_threads()
    try:
        numbers = report(tmp_path / "run", batch_size=8, repeats=2, warmup=1, cpu_threads=1)
    finally:
        torch.set_num_threads(threads)
    assert numbers["student"]["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert numbers["teacher"]["accuracy"] == pytest.approx(metrics["teacher/test_acc"], abs=1e-6)


def test_a_teacher_with_its_own_tokenizer_reads_only_its_ids(
    text_data: dict[str, Path], tmp_path: Path, kd_home, monkeypatch
) -> None:
    teacher_vocab = len(AutoTokenizer.from_pretrained(str(text_data["teacher_tok"])))
    seen: list[set[str]] = []
    original = Teacher.teacher_input

    def recording(self, x):
        out = original(self, x)
        seen.append(set(out))
        return out

    monkeypatch.setattr(Teacher, "teacher_input", recording)
    extra = [
        f"data.teacher_tokenizer={text_data['teacher_tok']}",
        f"teacher.model.config.vocab_size={teacher_vocab}",
        "teacher.input={_target_: kd_lightning.teacher_inputs.TokenInput}",
    ]
    summary = distill(compose_config(tmp_path / "run", overrides(text_data, *extra)))
    assert "teacher/test_acc" in summary["metrics"]
    # Every teacher forward of the distillation read the teacher's own tokenisation, never the student's keys.
    assert seen and all(keys == {"input_ids", "attention_mask"} for keys in seen)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused_before_training(text_data, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.config\.vocab_size: the model embeds 5 token ids"):
        distill(compose_config(tmp_path / "run", overrides(text_data, "student.model.config.vocab_size=5")))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_token_ids_of_the_two_tokenizers_differ(text_data: dict[str, Path]) -> None:
    """The fixture is a real cross-tokenizer case: the same sentence gets different ids and lengths."""
    student = AutoTokenizer.from_pretrained(str(text_data["student_tok"]))
    teacher = AutoTokenizer.from_pretrained(str(text_data["teacher_tok"]))
    a, b = student(SENTENCES[5])["input_ids"], teacher(SENTENCES[5])["input_ids"]
    assert a != b and len(a) != len(b)
    assert torch.tensor(b).max() < len(teacher)
