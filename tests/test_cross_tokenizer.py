"""Cross-tokenizer distillation: ULD against NumPy, span alignment, vocabulary mapping and the GOLD loss."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from kd_lightning.llm.cross_tokenizer import gold_loss, span_log_probs, uld_loss
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.span_alignment import align_spans
from kd_lightning.llm.vocab_mapping import VocabMapping, normalize_token, normalized_vocab
from tests.text_fixtures import bpe_tokenizer, word_tokenizer


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(z: np.ndarray) -> np.ndarray:
    return np.log(softmax(z))


# ---------------------------------------------------------------------------------------------- ULD
def uld_reference(student: np.ndarray, teacher: np.ndarray, mask: np.ndarray, temperature: float) -> float:
    """Sorted-probability L1, position by position, from the paper's definition."""
    size = max(student.shape[1], teacher.shape[1])
    distances = []
    for s, t, valid in zip(softmax(student / temperature), softmax(teacher / temperature), mask, strict=True):
        if valid:
            s_sorted = np.concatenate([np.sort(s)[::-1], np.zeros(size - s.size)])
            t_sorted = np.concatenate([np.sort(t)[::-1], np.zeros(size - t.size)])
            distances.append(np.abs(s_sorted - t_sorted).sum())
    return float(np.mean(distances))


@pytest.mark.parametrize(("student_vocab", "teacher_vocab"), [(7, 11), (11, 7), (9, 9)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_uld_matches_numpy(student_vocab: int, teacher_vocab: int, temperature: float, masked: bool) -> None:
    g = torch.Generator().manual_seed(student_vocab * 100 + teacher_vocab)
    student = torch.randn(6, student_vocab, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(6, teacher_vocab, generator=g, dtype=torch.float64) * 3
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    value = uld_loss(student, teacher, mask=mask, temperature=temperature)
    expected = uld_reference(
        student.numpy(), teacher.numpy(), np.ones(6, bool) if mask is None else mask.numpy(), temperature
    )
    assert value.shape == ()
    np.testing.assert_allclose(value.item(), expected, rtol=1e-10)


def test_uld_leading_dims_and_empty_mask() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 8, generator=g)
    mask = torch.tensor([[True, False, True], [False, True, True]])
    flat = uld_loss(student.reshape(6, 5), teacher.reshape(6, 8), mask=mask.reshape(6))
    torch.testing.assert_close(uld_loss(student, teacher, mask=mask), flat)
    student.requires_grad_()
    empty = uld_loss(student, teacher, mask=torch.zeros(2, 3, dtype=torch.bool))
    empty.backward()
    assert empty.item() == 0.0 and student.grad is not None
    with pytest.raises(ValueError, match="same positions"):
        uld_loss(student, teacher[:, :2])
    with pytest.raises(ValueError, match="temperature"):
        uld_loss(student, teacher, temperature=0.0)


def test_uld_is_zero_for_a_permuted_teacher() -> None:
    """Sorted optimal transport ignores which token is which, and zero-padding ignores zero-probability tokens."""
    g = torch.Generator().manual_seed(2)
    teacher = torch.randn(5, 8, generator=g) * 2
    permuted = teacher[:, torch.randperm(8, generator=g)]
    assert uld_loss(permuted, teacher).item() == pytest.approx(0.0, abs=1e-7)
    padded = torch.cat([permuted, torch.full((5, 3), float("-inf"))], dim=1)  # three tokens of probability 0
    assert uld_loss(padded, teacher, temperature=1.7).item() == pytest.approx(0.0, abs=1e-7)
    assert uld_loss(torch.randn(5, 8, generator=g), teacher).item() > 0.05


def test_uld_gradient_reaches_the_student_only() -> None:
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 6, generator=g, requires_grad=True)
    teacher = torch.randn(4, 9, generator=g, requires_grad=True)
    uld_loss(student, teacher, temperature=2.0).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    torch.testing.assert_close(student.grad.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)  # softmax Jacobian


# ---------------------------------------------------------------------------------------- alignment
def test_align_spans_on_hand_made_offsets() -> None:
    # "unbelievable cats": ["un", "believ", "able", " cats"] vs ["unbeliev", "able", " c", "ats"]
    student = [(0, 2), (2, 8), (8, 12), (12, 17)]
    teacher = [(0, 8), (8, 12), (12, 14), (14, 17)]
    expected = [(range(0, 2), range(0, 1)), (range(2, 3), range(1, 2)), (range(3, 4), range(2, 4))]
    assert align_spans(student, teacher) == expected
    assert align_spans(torch.tensor(student), torch.tensor(teacher)) == expected
    # special tokens (empty offsets) before, after and between spans belong to no span
    with_specials = [(0, 0), *student[:3], (0, 0), student[3], (0, 0)]
    assert align_spans(with_specials, teacher) == [
        (range(1, 3), range(0, 1)),
        (range(3, 4), range(1, 2)),
        (range(5, 6), range(2, 4)),
    ]
    # a byte-level tokenizer splitting one character into tokens that share its offsets
    assert align_spans([(0, 1), (0, 1), (1, 3)], [(0, 3)]) == [(range(0, 3), range(0, 1))]
    assert align_spans([(0, 1), (0, 1), (1, 3)], [(0, 1), (1, 3)]) == [
        (range(0, 2), range(0, 1)),
        (range(2, 3), range(1, 2)),
    ]
    # ... or one character between two tokens with overlapping offsets: no boundary inside it
    assert align_spans([(0, 2), (1, 3)], [(0, 2), (2, 3)]) == [(range(0, 2), range(0, 2))]
    assert align_spans([(0, 0)], []) == []


def test_align_spans_refuses_inconsistent_offsets() -> None:
    student = [(0, 2), (2, 8), (8, 12), (12, 17)]
    with pytest.raises(ValueError, match=r"same text.*17.*18"):
        align_spans(student, [(0, 8), (8, 12), (12, 18)])
    with pytest.raises(ValueError, match="same text"):
        align_spans(student, [(0, 0)])
    with pytest.raises(ValueError, match="not in text order"):
        align_spans([(0, 2), (8, 12), (2, 8)], [(0, 12)])
    with pytest.raises(ValueError, match="inside the text span"):
        align_spans([(0, 2), (0, 0), (2, 8)], [(0, 8)])
    with pytest.raises(ValueError, match="0 <= start <= end"):
        align_spans([(3, 2)], [(0, 3)])


@pytest.fixture(scope="module")
def tokenizers_pair(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[PreTrainedTokenizerBase, PreTrainedTokenizerBase]:
    """(student, teacher): the word-level fixture tokenizer (adds [CLS] ... [SEP]) and the byte-level BPE one."""
    root: Path = tmp_path_factory.mktemp("cross_tokenizers")
    student = AutoTokenizer.from_pretrained(str(word_tokenizer(root / "word")))
    teacher = AutoTokenizer.from_pretrained(str(bpe_tokenizer(root / "bpe")))
    return student, teacher


def test_align_spans_on_real_tokenizers(tokenizers_pair) -> None:
    student_tok, teacher_tok = tokenizers_pair
    text = "stars shine bright above the desert tonight"
    student = student_tok(text, return_offsets_mapping=True)["offset_mapping"]
    teacher = teacher_tok(text, return_offsets_mapping=True)["offset_mapping"]
    assert student[0] == student[-1] == (0, 0)  # [CLS], [SEP]
    spans = align_spans(student, teacher)
    assert [i for s, _ in spans for i in s] == list(range(1, len(student) - 1))  # every word once, in order
    assert [i for _, t in spans for i in t] == list(range(len(teacher)))
    for s, t in spans:
        s_text = text[student[s.start][0] : student[s.stop - 1][1]]
        t_text = text[teacher[t.start][0] : teacher[t.stop - 1][1]]
        assert s_text.strip() == t_text.strip() != ""
    assert len(spans) == len(text.split())  # the word-level side ends a token at every word


# ------------------------------------------------------------------------------------- vocabularies
def test_normalize_token() -> None:
    assert normalize_token("Ġcat") == normalize_token("▁cat") == " cat"
    assert normalize_token("ĠĠ") == "  "
    assert normalize_token("##cat", "##") == "cat"
    assert normalize_token("##cat") == "##cat"  # no continuation prefix: '##' is text (markdown, hashtags)
    assert normalize_token("##", "##") == "##"


def test_vocab_mapping_on_real_tokenizers(tokenizers_pair) -> None:
    student_tok, teacher_tok = tokenizers_pair
    mapping = VocabMapping.from_tokenizers(student_tok, teacher_tok)
    assert mapping.student_size == len(student_tok) and mapping.teacher_size == len(teacher_tok)
    for word in ("the", "a", "on", "rain"):
        ids = (student_tok.convert_tokens_to_ids(word), teacher_tok.convert_tokens_to_ids(word))
        assert mapping.shared[word] == ids
    # byte-level 'Ġthe' is ' the', which the word-level vocabulary (no spaces) does not have
    assert " the" not in mapping.shared and "Ġthe" in teacher_tok.get_vocab()
    assert "cat" not in mapping.shared and "[CLS]" not in mapping.shared and "<s>" not in mapping.shared
    pairs = list(zip(mapping.student_ids.tolist(), mapping.teacher_ids.tolist(), strict=True))
    assert pairs == list(mapping.shared.values())
    for ids, unmatched, size in (
        (mapping.student_ids, mapping.student_unmatched, mapping.student_size),
        (mapping.teacher_ids, mapping.teacher_unmatched, mapping.teacher_size),
    ):
        assert sorted(ids.tolist() + unmatched.tolist()) == list(range(size))  # a partition of the ids
    padded = VocabMapping.from_tokenizers(student_tok, teacher_tok, teacher_size=len(teacher_tok) + 4)
    assert padded.teacher_unmatched[-4:].tolist() == list(range(len(teacher_tok), len(teacher_tok) + 4))
    with pytest.raises(ValueError, match="student_size"):
        VocabMapping.from_tokenizers(student_tok, teacher_tok, student_size=3)


def test_normalized_vocab_drops_ambiguous_wordpiece_entries() -> None:
    vocab = {"[UNK]": 0, "a": 1, "##a": 2, "cat": 3, "##s": 4, "Ġx": 5}
    normalized = normalized_vocab(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")))
    assert normalized == {"[UNK]": 0, "cat": 3, "s": 4, " x": 5}  # 'a' and '##a' both read 'a'


# --------------------------------------------------------------------------------------------- GOLD
def test_span_log_probs_follow_the_chain_rule() -> None:
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(9, 6, generator=g, dtype=torch.float64) * 2
    ids = torch.randint(0, 6, (9,), generator=g)
    spans = [range(1, 4), range(4, 5), range(5, 9)]
    merged = span_log_probs(logits, ids, spans, temperature=1.5).numpy()
    log_p = log_softmax(logits.numpy() / 1.5)  # row j predicts token j + 1
    for k, span in enumerate(spans):
        prefix = sum(log_p[j - 1, ids[j]] for j in span[:-1])
        np.testing.assert_allclose(merged[k], prefix + log_p[span[-1] - 1], rtol=1e-12)
        text_log_prob = sum(log_p[j - 1, ids[j]] for j in span)  # the span's own text
        assert merged[k, ids[span[-1]]] == pytest.approx(text_log_prob, rel=1e-12)
    with pytest.raises(ValueError, match="token 0"):
        span_log_probs(logits, ids, [range(0, 2)])
    with pytest.raises(ValueError, match="non-empty"):
        span_log_probs(logits, ids, [range(3, 3)])


def tiny_gold_example() -> tuple[torch.Tensor, torch.Tensor, list[int], list[int], list, VocabMapping]:
    """Text "abc" after <s>: student ["<s>", "a", "b", "c"], teacher ["<s>", "ab", "c"]; logits = log p."""
    student_vocab = {"<s>": 0, "a": 1, "b": 2, "c": 3}
    teacher_vocab = {"<s>": 0, "ab": 1, "c": 2, "a": 3, "x": 4}
    student_p = [[0.1, 0.5, 0.2, 0.2], [0.1, 0.2, 0.6, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25] * 4]
    teacher_p = [[0.1, 0.4, 0.1, 0.3, 0.1], [0.05, 0.05, 0.7, 0.1, 0.1], [0.2] * 5]
    spans = [(range(1, 3), range(1, 2)), (range(3, 4), range(2, 3))]  # "ab", "c"
    mapping = VocabMapping(student_vocab, teacher_vocab)
    student = torch.tensor(student_p, dtype=torch.float64).log()
    return student, torch.tensor(teacher_p, dtype=torch.float64).log(), [0, 1, 2, 3], [0, 1, 2], spans, mapping


def test_gold_loss_equals_a_hand_computed_value() -> None:
    student, teacher, student_ids, teacher_ids, spans, mapping = tiny_gold_example()
    assert mapping.shared == {"<s>": (0, 0), "a": (1, 3), "c": (3, 2)}
    assert mapping.student_unmatched.tolist() == [2] and mapping.teacher_unmatched.tolist() == [1, 4]
    # span "ab": q_s = p_s(a | <s>) * p_s(. | <s> a) = 0.5 * [.1, .2, .6, .1] = [.05, .1, .3, .05];
    #            q_t = p_t(. | <s>) = [.1, .4, .1, .3, .1]
    #   shared (<s>, a, c): q_t = .1, .3, .1 vs q_s = .05, .1, .05
    #   I-divergence = .1 ln 2 - .05 + .3 ln 3 - .2 + .1 ln 2 - .05 = .2 ln 2 + .3 ln 3 - .3
    #   unmatched: student [.3] vs teacher sorted [.4, .1] -> |.3 - .4| + |0 - .1| = .2
    # span "c": q_s = p_s(. | <s> a b) = [.1, .1, .2, .6]; q_t = p_t(. | <s> ab) = [.05, .05, .7, .1, .1]
    #   shared: q_t = .05, .1, .7 vs q_s = .1, .1, .6
    #   I-divergence = .05 ln .5 + .05 + 0 + .7 ln(7/6) - .1 = -.05 ln 2 + .7 ln(7/6) - .05
    #   unmatched: student [.2] vs teacher sorted [.1, .05] -> .1 + .05 = .15
    matched = [0.2 * math.log(2) + 0.3 * math.log(3) - 0.3, -0.05 * math.log(2) + 0.7 * math.log(7 / 6) - 0.05]
    unmatched = [0.2, 0.15]
    value = gold_loss(student, teacher, student_ids, teacher_ids, spans, mapping)
    assert value.item() == pytest.approx((sum(matched) + sum(unmatched)) / 2, rel=1e-12)
    assert value.item() == pytest.approx((0.15 * math.log(2) + 0.3 * math.log(3) + 0.7 * math.log(7 / 6)) / 2)
    only_unmatched = gold_loss(student, teacher, student_ids, teacher_ids, spans, mapping, matched_weight=0.0)
    assert only_unmatched.item() == pytest.approx(0.175, rel=1e-12)
    weighted = gold_loss(
        student, teacher, student_ids, teacher_ids, spans, mapping, matched_weight=0.6, unmatched_weight=0.4
    )
    assert weighted.item() == pytest.approx((0.6 * sum(matched) + 0.4 * sum(unmatched)) / 2, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gold_loss_is_forward_kl_for_one_tokenizer(temperature: float) -> None:
    g = torch.Generator().manual_seed(5)
    student = torch.randn(8, 10, generator=g, dtype=torch.float64)
    teacher = torch.randn(8, 10, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 10, (8,), generator=g)
    vocab = {f"tok{i}": i for i in range(10)}
    mapping = VocabMapping(vocab, vocab)
    assert mapping.student_unmatched.numel() == mapping.teacher_unmatched.numel() == 0
    spans = [(range(j, j + 1), range(j, j + 1)) for j in range(1, 8)]
    value = gold_loss(student, teacher, ids, ids, spans, mapping, temperature=temperature)
    expected = ForwardKL(temperature=temperature)(student[:-1], teacher[:-1]).mean()
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


def test_gold_loss_gradient_reaches_the_student_only_and_checks_inputs() -> None:
    student, teacher, student_ids, teacher_ids, spans, mapping = tiny_gold_example()
    student.requires_grad_()
    teacher.requires_grad_()
    gold_loss(student, teacher, student_ids, teacher_ids, spans, mapping, temperature=1.5).backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad[:3].abs().sum() > 0
    assert student.grad[3].abs().sum() == 0  # the last row predicts nothing inside the spans
    empty = gold_loss(student, teacher, student_ids, teacher_ids, [], mapping)
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="logit widths"):
        gold_loss(student[:, :3], teacher, student_ids, teacher_ids, spans, mapping)
    with pytest.raises(ValueError, match="token 0"):
        gold_loss(student, teacher, student_ids, teacher_ids, [(range(0, 3), range(0, 2))], mapping)


def test_gold_loss_end_to_end_on_real_tokenizers(tokenizers_pair) -> None:
    """Word-level student, byte-level BPE teacher: prompt + completion encoded by each, aligned, distilled."""
    student_tok, teacher_tok = tokenizers_pair
    prompt, completion = "the cat sat on", " the mat"
    student = student_tok(prompt + completion, return_offsets_mapping=True)
    teacher = teacher_tok(prompt + completion, return_offsets_mapping=True)
    spans = align_spans(student["offset_mapping"], teacher["offset_mapping"])
    completion_spans = [(s, t) for s, t in spans if teacher["offset_mapping"][t.start][1] > len(prompt)]
    assert [(s.start, t.start) for s, t in completion_spans] == [(5, 8), (6, 9)]  # "the", "mat"
    mapping = VocabMapping.from_tokenizers(student_tok, teacher_tok)
    g = torch.Generator().manual_seed(6)
    student_logits = torch.randn(len(student["input_ids"]), mapping.student_size, generator=g, requires_grad=True)
    teacher_logits = torch.randn(len(teacher["input_ids"]), mapping.teacher_size, generator=g)
    args = (student["input_ids"], teacher["input_ids"], completion_spans, mapping)
    value = gold_loss(student_logits, teacher_logits, *args, temperature=2.0)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert student_logits.grad[[4, 5]].abs().sum() > 0  # rows predicting "the" and "mat"
    assert student_logits.grad[:4].abs().sum() == 0
