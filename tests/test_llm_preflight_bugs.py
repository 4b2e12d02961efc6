"""kd-llm-distill's pre-flight for known KD bugs (kd_lightning/recipes/llm_bug_checks.py,
kd_lightning/methods/lm/bug_checks.py): every bug class it guards against is planted into the objects of a real
tiny run (its loss, models, tokenizer, datamodule) and caught with one line naming the cause; the shipped
configurations pass."""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import ForwardKL, GeneralizedJSD
from kd_lightning.llm.protocol import ANY_SOURCE
from kd_lightning.llm.tokens import IGNORE_INDEX, SparseTeacher
from kd_lightning.recipes import llm_distill
from kd_lightning.recipes.llm_bug_checks import preflight_bugs
from tests.conftest import compose_config

TINY = ["llm/teacher=tiny", "llm/student=tiny", "llm.data.train_prompts.num_prompts=16"]
TINY += ["llm.data.val_prompts.num_prompts=4", "trainer.max_steps=1"]
#: Shipped configurations (tiny models) -> their overrides and the number of checks that apply to them: 4 on the
#: data, then the loss's (ce_on_samples, masked_positions, padded_vocab, bf16_floor with the loss's identity,
#: alignment, identity of the teacher as student), the BOS, top-k rows, packing of each model.
SHIPPED = {
    "forward_kl": (["llm/loss=forward_kl"], 11),
    "on_policy_jsd": (["llm/method=on_policy", "llm/loss=jsd"], 11),
    "on_policy_prompts": (["llm/method=on_policy", "llm/loss=jsd", "llm.data.prompt_only=true"], 9),
    "top_k_cache": (["llm/teacher_cache=top_k"], 9),
    "packing": (["llm.data.packing=true", "llm.data.pack_length=480"], 13),
    "uld": (["llm/loss=uld"], 7),
    "uld_two_tokenizers": (["llm/loss=uld", "llm/student=bpe_llama"], 7),
    "reverse_kl_sampled": (["llm/method=on_policy", "llm/loss=reverse_kl_sampled"], 11),
    "bf16_teacher": (["llm.teacher.dtype=bfloat16"], 11),
    "hidden_mse": (["llm/hidden=mse"], 11),
    "sft": (["llm/method=sft"], 9),
    "distillm2": (["llm/method=distillm2", "llm.method.generation.max_new_tokens=8"], 11),
    "mixture": (["llm/teacher=mixture_tiny", "llm/method=multi_teacher"], 4),
}


class BeforeFit(Exception):
    """Raised in place of the pre-flight: the run's objects were captured."""


def run_objects(name: str, home: Path) -> tuple[Any, Any, Any]:
    """``(method, datamodule, tokenizer)`` of a tiny kd-llm-distill run, as the recipe passes them to the pre-flight."""
    captured = {}

    def capture(method: Any, datamodule: Any, tokenizer: Any, enabled: Any = True) -> None:
        captured["objects"] = (method, datamodule, tokenizer)
        raise BeforeFit

    cfg = compose_config(home / "preflight_bugs" / name, [*TINY, *SHIPPED[name][0]], config_name="llm_distill")
    with mock.patch.object(llm_distill, "preflight_bugs", capture), pytest.raises(BeforeFit):
        llm_distill.distill(cfg)
    return captured["objects"]


@functools.cache
def shipped(name: str, home: Path) -> tuple[Any, Any, Any]:
    return run_objects(name, home)


def planted(name: str, home: Path) -> tuple[Any, Any, Any]:
    """A deep copy of a shipped run's objects, to plant a bug in."""
    return copy.deepcopy(shipped(name, home))


def caught(objects: tuple[Any, Any, Any], check: str) -> str:
    """The pre-flight's one-line error, which must name ``check``."""
    with pytest.raises(ConfigError) as error:
        preflight_bugs(*objects)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"pre-flight ({check}): "), message
    assert message.endswith("(skip all pre-flight checks: llm.preflight=false)")
    return message


@pytest.mark.parametrize("name", list(SHIPPED))
def test_preflight_passes_on_the_shipped_configs(name: str, kd_home: Path, capsys) -> None:
    preflight_bugs(*shipped(name, kd_home))
    out = capsys.readouterr()
    line = re.search(r"pre-flight: (\d+) checks passed in ([\d.]+) s", out.out + out.err)
    assert line is not None and int(line.group(1)) == SHIPPED[name][1]
    assert float(line.group(2)) < 5.0


def test_preflight_is_skipped_by_its_config_key(kd_home: Path) -> None:
    method, datamodule, tokenizer = planted("forward_kl", kd_home)
    method.loss.vocab_size = 10  # a bug it would catch
    preflight_bugs(method, datamodule, tokenizer, False)
    with pytest.raises(ConfigError, match=r"llm.preflight"):
        preflight_bugs(method, datamodule, tokenizer, "yes")


# ------------------------------------------------------------------------------------- the bug classes
def test_off_by_one_teacher_positions_are_caught(kd_home: Path) -> None:
    """(b) The teacher's outputs shifted by one position (teacher row t reads token t + 1), both directions."""
    for shift, where in ((-1, "one position ahead of"), (1, "behind")):
        objects = planted("forward_kl", kd_home)
        method = objects[0]
        outputs = method.teacher_outputs

        def shifted(loss, batch, monitor, outputs=outputs, shift=shift):
            out = outputs(loss, batch, monitor)
            return {**out, "teacher_hidden": torch.roll(out["teacher_hidden"], shift, dims=1)}

        method.teacher_outputs = shifted
        assert where in caught(objects, "alignment")


def test_a_later_position_the_planted_token_leaves_unmoved_is_not_a_misalignment(kd_home: Path) -> None:
    """A loss that reads one teacher log-prob per position (sampled tokens) can be unmoved by a token far back (seen
    on SmolLM2: 2.7e-5 against 11.4 at the planted position): only a change before the planted position, in another
    row, or none at it is a misalignment. Here the planted token leaves the last position it moved unmoved."""
    from kd_lightning.methods.lm import bug_checks

    real_grads, real_check, first = bug_checks.position_grads, bug_checks.check_alignment, []

    def grads(method: Any, batch: Any, hidden: Tensor, source: Any) -> Tensor:
        out = real_grads(method, batch, hidden, source)
        if not first:  # check_alignment asks for the planted batch's first, then the batch's own
            first.append(out)
            return out
        planted_out = first.pop()
        moved = ((planted_out - out).abs() > 0).nonzero()
        assert len(moved) >= 2
        row, last = moved[-1].tolist()
        out = out.clone()
        out[row, last] = planted_out[row, last]
        return out

    def check(*args: Any) -> None:
        with mock.patch.object(bug_checks, "position_grads", grads):
            real_check(*args)

    with mock.patch.object(bug_checks, "check_alignment", check):
        preflight_bugs(*planted("forward_kl", kd_home))  # passes


def test_a_loss_that_does_not_vanish_at_student_equals_teacher_is_caught(kd_home: Path) -> None:
    """(a) A cross-entropy to the teacher's soft targets in place of the KL: the same gradient, but a floor of
    the teacher's entropy that hides what is left to learn."""

    class SoftCrossEntropy(ForwardKL):
        def per_token(self, log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
            return -(log_p_teacher.exp() * log_p_student).sum(-1)

    objects = planted("forward_kl", kd_home)
    objects[0].loss.divergence = SoftCrossEntropy()
    assert "does not vanish" in caught(objects, "identity")


def test_teacher_rows_of_other_examples_are_caught(kd_home: Path) -> None:
    """(b) The teacher's rows permuted across the batch (e.g. its rows sorted by length, the student's not)."""
    objects = planted("forward_kl", kd_home)
    method = objects[0]
    outputs = method.teacher_outputs

    def permuted(loss, batch, monitor):
        out = outputs(loss, batch, monitor)
        return {**out, "teacher_hidden": torch.roll(out["teacher_hidden"], 1, dims=0)}

    method.teacher_outputs = permuted
    assert "mixed across rows with" in caught(objects, "alignment")


def test_teacher_outputs_other_than_its_logits_are_caught(kd_home: Path) -> None:
    """(a) student == teacher must give loss 0 and gradient 0: teacher outputs read before the final norm (here:
    scaled), which the loss alone cannot see, leave both non-zero at the teacher itself."""
    objects = planted("forward_kl", kd_home)
    method = objects[0]
    outputs = method.teacher_outputs

    def scaled(loss, batch, monitor):
        out = outputs(loss, batch, monitor)
        return {**out, "teacher_hidden": out["teacher_hidden"] * 2.0}

    method.teacher_outputs = scaled
    assert "not lm_head(final hidden state)" in caught(objects, "identity")


def test_unmasked_prompt_is_caught(kd_home: Path) -> None:
    """(c) A datamodule whose labels leave the prompt unmasked."""
    objects = planted("forward_kl", kd_home)
    collate = objects[1].collate

    def unmasked(examples):
        batch = collate(examples)
        return {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)}

    objects[1].collate = unmasked
    assert "prompt tokens enter the loss" in caught(objects, "prompt_labels")


def test_labelled_padding_is_caught(kd_home: Path) -> None:
    """(c) Padding labelled with the pad id instead of -100."""
    objects = planted("forward_kl", kd_home)
    collate, pad = objects[1].collate, objects[2].pad_token_id

    def padded(examples):
        batch = collate(examples)
        return {**batch, "labels": batch["labels"].masked_fill(batch["attention_mask"] == 0, pad)}

    objects[1].collate = padded
    caught(objects, "padding_labels")


def test_labels_shifted_twice_are_caught(kd_home: Path) -> None:
    """Labels already shifted by the datamodule and shifted again by the loss."""
    objects = planted("forward_kl", kd_home)
    collate = objects[1].collate

    def shifted(examples):
        batch = collate(examples)
        return {**batch, "labels": F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)}

    objects[1].collate = shifted
    assert "shifts them again" in caught(objects, "label_shift")


def test_a_loss_reading_masked_positions_is_caught(kd_home: Path) -> None:
    """(c) A loss that selects its tokens by attention_mask (prompt included) instead of the labels."""
    objects = planted("forward_kl", kd_home)
    method = objects[0]
    loss = method.loss
    original = type(loss).forward

    def by_attention(self, hidden, head, labels, **kwargs):
        return original(self, hidden, head, torch.where(labels == IGNORE_INDEX, 5, labels), **kwargs)

    method.loss.forward = by_attention.__get__(loss)
    caught(objects, "masked_positions")


def test_padded_vocabulary_entering_the_loss_is_caught(kd_home: Path) -> None:
    """(d) Heads padded beyond the tokenizer (128 rows for 99 ids) compared over all their rows."""
    objects = planted("forward_kl", kd_home)
    objects[0].loss.vocab_size = None
    assert "set llm.loss.vocab_size=99" in caught(objects, "padded_vocab")


def test_a_vocabulary_smaller_than_the_tokenizer_is_caught(kd_home: Path) -> None:
    """(i) The loss's vocabulary cut below the tokenizer's ids."""
    objects = planted("forward_kl", kd_home)
    objects[0].loss.vocab_size = 64
    assert "smaller than the tokenizer" in caught(objects, "vocab_mismatch")


def test_a_teacher_reading_other_tokens_is_caught(kd_home: Path) -> None:
    """(d) BOS asymmetry: the teacher's rows get a BOS the student's lack (same tokenizer)."""
    objects = planted("forward_kl", kd_home)
    loss, bos = objects[0].loss, objects[2].eos_token_id

    def with_bos(batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        return F.pad(ids, (1, 0), value=bos)[:, :-1], mask

    loss.teacher_tokens = with_bos
    caught(objects, "bos")


def test_a_bos_on_one_side_across_tokenizers_is_caught(kd_home: Path) -> None:
    """(d) BOS asymmetry across tokenizers (ULD): the teacher's rows start with its BOS, the student's not
    (or the reverse): position-aligned losses then compare shifted positions."""
    objects = planted("uld_two_tokenizers", kd_home)
    collate, bos = objects[1].collate, objects[1].encoder.teacher.tokenizer.bos_token_id

    def one_sided(examples):
        batch = collate(examples)
        ids, mask = batch["teacher_input_ids"].clone(), batch["teacher_attention_mask"]
        first = mask.long().argmax(dim=1)
        rows = torch.arange(ids.shape[0])
        ids[rows, first] = torch.where(ids[rows, first] == bos, bos + 1, bos)
        return {**batch, "teacher_input_ids": ids}

    objects[1].collate = one_sided
    assert "start with its tokenizer's BOS" in caught(objects, "bos")


def test_a_loss_computed_in_bfloat16_is_caught(kd_home: Path) -> None:
    """(e) The bf16 KL floor: logits left in bfloat16 (no upcast) before log_softmax, for the KL and the JSD."""

    def no_upcast(hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab: int) -> Tensor:
        return F.linear(hidden.to(weight.dtype), weight[:vocab], None if bias is None else bias[:vocab])

    for divergence in (ForwardKL(), GeneralizedJSD(beta=0.5)):
        objects = planted("forward_kl", kd_home)
        objects[0].loss.divergence = divergence
        with mock.patch("kd_lightning.llm.token_loss.head_logits", no_upcast):
            assert "upcast logits to float32" in caught(objects, "bf16_floor")


def test_cross_entropy_on_sampled_tokens_is_caught(kd_home: Path) -> None:
    """(f) A loss whose cross-entropy reads the student's own samples."""
    objects = planted("forward_kl", kd_home)
    objects[0].loss.reads = {"ce": ANY_SOURCE, "distill": ANY_SOURCE}
    caught(objects, "ce_on_samples")


def test_packed_rows_running_into_each_other_are_caught(kd_home: Path) -> None:
    """(g) Packed rows whose position_ids do not restart at each example."""
    objects = planted("packing", kd_home)
    collate = objects[1].collate

    def running(examples):
        batch = collate(examples)
        return {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])}

    objects[1].collate = running
    caught(objects, "packed_rows")


def test_top_k_renormalised_over_k_is_caught(kd_home: Path) -> None:
    """(h) Cached top-k rows that are a softmax over the k alone (no tail mass)."""
    objects = planted("top_k_cache", kd_home)
    cache = objects[0].logit_cache
    lookup = cache.lookup

    def renormalised(batch, temperature=None):
        rows = lookup(batch, temperature)
        log_probs = torch.log_softmax(rows.log_probs.float(), dim=1)
        return SparseTeacher(rows.ids, log_probs, torch.full_like(rows.tail, -80.0))

    cache.lookup = renormalised
    assert "softmax over the top k alone" in caught(objects, "topk_softmax")
