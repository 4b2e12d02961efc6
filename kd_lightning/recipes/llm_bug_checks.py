"""``kd-llm-distill``'s pre-flight for known KD bugs (``llm.preflight``, on by default): on one batch of the
run's training examples, with its loss, models and tokenizers, right before ``fit``.

The data side lives here (labels, packing, vocabularies, BOS); the loss side, which runs the method's own loss
and teacher, in :mod:`kd_lightning.methods.lm.bug_checks`. Which checks apply depends on the run: a live
teacher of the student's tokenizer gets them all; a top-k cache or a served teacher gets its rows checked
instead of student == teacher and the planted token (its rows are fixed: no teacher to re-run); a
cross-tokenizer loss, several teachers, or a scheme without a loss get the data checks only. Prompt-only
data (on-policy) is checked on the student's samples of its prompts (``OnPolicy.sample``), whose labels the
scheme writes: the checks of labels against the dataset's completions do not apply.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kd_lightning.engine.errors import check_type
from kd_lightning.engine.run_dir import announce
from kd_lightning.llm.protocol import SOURCE_KEY, TokenSource, batch_source
from kd_lightning.llm.tokens import IGNORE_INDEX, SparseTeacher, sequence_inputs
from kd_lightning.methods.lm import bug_checks as lm_checks
from kd_lightning.methods.lm.bug_checks import fail
from kd_lightning.methods.lm.heads import check_packing

#: Examples of the batch the pre-flight runs on.
PREFLIGHT_EXAMPLES = 4


def check_padding_labels(batch: Mapping[str, Any], prefix: str = "") -> None:
    """(c) Padding carries label -100."""
    labels, mask = batch[f"{prefix}labels"], batch[f"{prefix}attention_mask"]
    if bool((labels[mask == 0] != IGNORE_INDEX).any()):
        raise fail(
            "padding_labels",
            f"padding tokens of the batch carry labels ({int((labels[mask == 0] != IGNORE_INDEX).sum())} of them): "
            "the loss trains the student to predict padding",
            "label padding -100 in the datamodule's collate (kd_lightning.llm.encoding.ExampleEncoder.collate)",
        )


def check_prompt_labels(batch: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]) -> None:
    """(c) Only completion tokens are labelled (the prompt carries -100): as many labels as completion tokens,
    each the token at its own position (labels are not shifted in the data: the loss shifts them)."""
    labels, inputs = batch["labels"], batch["input_ids"]
    count, completions = int((labels != IGNORE_INDEX).sum()), sum(len(e["completion"]) for e in examples)
    if count != completions:
        raise fail(
            "prompt_labels",
            f"the batch labels {count} tokens but its examples have {completions} completion tokens: "
            + ("prompt tokens enter the loss" if count > completions else "completion tokens are left out"),
            "label the completion only, -100 on the prompt (kd_lightning.llm.encoding.ExampleEncoder.collate)",
        )
    kept = labels != IGNORE_INDEX
    if not torch.equal(labels[kept], inputs[kept]):
        raise fail(
            "label_shift",
            "labels differ from the input tokens at their positions: the data shifted them and the loss shifts "
            "them again (output t predicts labels[t + 1])",
            "keep labels aligned with input_ids in the datamodule; the loss does the shift",
        )


def check_packed_rows(batch: Mapping[str, Any], examples: Sequence[Mapping[str, Any]]) -> None:
    """(g) Packed rows: ``position_ids`` restart at 0 at each example, and each segment holds exactly one
    example's completion labels (else tokens predict across examples)."""
    positions = batch.get("position_ids")
    if positions is None:
        return
    mask, labels = batch["attention_mask"].bool(), batch["labels"] != IGNORE_INDEX
    counts = []
    for row in range(positions.shape[0]):
        starts = ((positions[row] == 0) & mask[row]).nonzero().squeeze(1).tolist()
        for start, stop in zip(starts, [*starts[1:], positions.shape[1]], strict=True):
            counts.append(int(labels[row, start:stop].sum()))
    expected = sorted(len(e["completion"]) for e in examples)
    if sorted(counts) != expected:
        raise fail(
            "packed_rows",
            f"packed rows restart position_ids at {len(counts)} places for {len(examples)} examples (labels per "
            f"segment {sorted(counts)}, completions {expected}): examples run into each other",
            "restart position_ids at 0 at every example (kd_lightning.llm.packing.pack_batch), or set "
            "llm.data.packing=false",
        )


def check_vocab_sizes(method: Any, vocab: int, teacher_vocab: int | None = None) -> None:
    """(i) Each head covers its tokenizer (the teacher's own, ``teacher_vocab`` ids, across tokenizers), and a
    same-vocabulary loss compares all of the tokenizer's ids."""
    heads = {"llm.student.model": (method.student, vocab)}
    if method.teacher is not None:
        heads["llm.teacher.model"] = (method.teacher, teacher_vocab or vocab)
    for key, (model, size) in heads.items():
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < size:
            raise fail(
                "vocab_mismatch",
                f"{key} has {rows} output logits for a {size}-token tokenizer",
                f"build {key} for this tokenizer",
            )
    size = getattr(method.loss, "vocab_size", None)
    if teacher_vocab is None and size is not None and size < vocab:
        raise fail(
            "vocab_mismatch",
            f"llm.loss.vocab_size={size} is smaller than the tokenizer ({vocab} ids): tokens {size}..{vocab - 1} "
            "have no probability in the loss",
            f"set llm.loss.vocab_size={vocab} (or null)",
        )


def check_bos(method: Any, batch: Mapping[str, Any], tokenizer: Any, teacher_tokenizer: Any) -> None:
    """(d) Teacher and student read their rows the same way: one tokenizer, the very same tokens; two
    tokenizers, a BOS at the start of both rows or of neither (one-sided BOS shifts position alignment)."""
    student = batch["input_ids"]
    teacher = method.loss.teacher_tokens(batch)[0]
    if teacher_tokenizer is None:
        if not torch.equal(teacher, student):
            raise fail(
                "bos",
                "the teacher reads other tokens than the student (a BOS or template added on one side?)",
                "give the teacher the student's input_ids (the loss's teacher_tokens)",
            )
        return
    sides = {}
    for name, ids, mask, tok in (
        ("student", student, batch["attention_mask"], tokenizer),
        ("teacher", teacher, batch["teacher_attention_mask"], teacher_tokenizer),
    ):
        first = ids.gather(1, mask.long().argmax(dim=1, keepdim=True)).squeeze(1)
        sides[name] = tok.bos_token_id is not None and bool((first == tok.bos_token_id).any())
    if sides["student"] != sides["teacher"]:
        raise fail(
            "bos",
            f"only the {'student' if sides['student'] else 'teacher'}'s rows start with its tokenizer's BOS",
            "encode both sides with the same add_special_tokens setting (kd_lightning.llm.aligned)",
        )


def preflight_batch(datamodule: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The first training examples and their batch, collated by the run's datamodule."""
    examples = list(datamodule.splits["train"][:PREFLIGHT_EXAMPLES])
    return datamodule.collate(examples), examples


def loss_checks(method: Any, batch: Mapping[str, Any], vocab: int) -> tuple[list[Callable[[], None]], list[str]]:
    """The loss-side checks that apply to this run, and the names of those skipped (why, in the name)."""
    loss = method.loss
    if loss is None or getattr(method, "teachers", None):
        return [], ["loss checks (no loss, or several teachers)"]
    if not any(batch_source(batch) in sources for sources in loss.reads.values()):  # a loss of samples only
        batch = {**batch, SOURCE_KEY: TokenSource.STUDENT.value}
    checks = [
        lambda: lm_checks.check_ce_on_samples(method, batch),
        lambda: lm_checks.check_masked_positions(method, batch),
    ]
    if loss.cross_tokenizer:
        return checks, ["identity, alignment, bf16_floor, padded_vocab (cross-tokenizer loss)"]
    checks += [  # the loss alone (its self-divergence) before the teacher's alignment, which needs it exact
        lambda: lm_checks.check_padded_vocab(method, batch, vocab),
        lambda: lm_checks.check_bf16_floor(method, batch),
    ]
    skipped = []
    if method.logit_cache is not None or method.served_teacher is not None:
        if loss.needs_teacher:
            checks.append(lambda: check_rows(method, batch, vocab))
        skipped = ["teacher as student, alignment (teacher rows fixed: top-k cache / served teacher)"]
    elif method.teacher is None or not loss.needs_teacher:
        skipped = ["teacher as student, alignment (no teacher in training)"]
    else:
        checks += [
            lambda: lm_checks.check_alignment(method, batch, vocab),
            lambda: lm_checks.check_identity(method, batch),
        ]
    return checks, skipped


def check_rows(method: Any, batch: Mapping[str, Any], vocab: int) -> None:
    """(h) The top-k rows the cache or the server gives for ``batch``."""
    rows = method.teacher_outputs(method.loss, batch, False).get("teacher_topk")
    if isinstance(rows, SparseTeacher):
        lm_checks.check_topk_rows(rows, vocab)


def preflight_bugs(method: Any, datamodule: Any, tokenizer: Any, enabled: Any = True) -> None:
    """Run every applicable check (``llm.preflight=false`` skips them); one line says how many passed."""
    check_type(enabled, bool, "llm.preflight")
    if not enabled:
        return
    start = time.perf_counter()
    batch, examples = preflight_batch(datamodule)
    vocab = len(tokenizer)
    encoder = getattr(datamodule, "encoder", None)
    teacher_tokenizer = getattr(getattr(encoder, "teacher", None), "tokenizer", None)
    checks: list[Callable[[], None]] = [
        lambda: check_vocab_sizes(method, vocab, len(teacher_tokenizer) if teacher_tokenizer else None)
    ]
    if "input_ids" not in batch and not hasattr(method, "sample"):
        checks[0]()
        announce("pre-flight: 1 check passed; prompt-only data and no sampling scheme: label and loss checks skipped")
        return
    if "input_ids" not in batch:  # prompt-only data (on-policy): the student's samples, as in training
        batch = method.sample(batch, 0)
        checks.append(lambda: check_padding_labels(batch))
    else:
        checks += [
            lambda: check_padding_labels(batch),
            lambda: check_prompt_labels(batch, examples),
            lambda: check_packed_rows(batch, examples),
        ]
    if method.loss is not None and method.teacher is not None:
        checks.append(lambda: check_bos(method, batch, tokenizer, teacher_tokenizer))
    if "position_ids" in batch:
        models = {"llm.student.model": method.student, "llm.teacher.model": method.teacher}
        checks += [
            lambda k=k, m=m: check_packing(m, k, *sequence_inputs(batch)[:2])
            for k, m in models.items()
            if isinstance(m, nn.Module)
        ]
    more, skipped = loss_checks(lm_checks.Probe(method), batch, vocab)
    was_training, labels_checked = method.training, getattr(method.loss, "labels_checked", None)
    method.eval()
    try:
        with torch.enable_grad():
            for check in [*checks, *more]:
                check()
    finally:  # as it was: training's first batch still gets the loss's own label check
        method.train(was_training)
        if labels_checked is not None:
            method.loss.labels_checked = labels_checked
    seconds = time.perf_counter() - start
    announce(
        f"pre-flight: {len(checks) + len(more)} checks passed in {seconds:.1f} s"
        + (f"; skipped: {'; '.join(skipped)}" if skipped else "")
    )
