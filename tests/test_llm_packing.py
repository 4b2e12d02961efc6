"""Sequence packing (kd_lightning.llm.packing, llm.data.packing): a packed batch gives every example the same
per-token losses and the student the same gradients as the padded batch, for every token loss with a live
teacher and with the logit cache, and for the cross-tokenizer losses; shifted teacher targets are caught."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch import Tensor
from transformers import masking_utils

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.bpe import train_bpe_tokenizer
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.encoding import ExampleEncoder
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.packing import example_ranges, first_fit, pack_batch
from kd_lightning.llm.protocol import TokenSource
from kd_lightning.llm.served import example_batches
from kd_lightning.llm.teacher_rows import example_keys
from kd_lightning.llm.tokens import (
    IGNORE_INDEX,
    SparseTeacher,
    final_hidden_states,
    next_token_targets,
    sequence_inputs,
)
from kd_lightning.methods.lm import TokenKD
from tests.test_cross_tokenizer_training import CORPUS, cross_setup

TOKEN_LOSSES = ["forward_kl", "reverse_kl", "jsd", "skl", "srkl", "tvd", "reverse_kl_sampled"]
TOL = 1e-5
Batch = Mapping[str, torch.Tensor]


@functools.cache
def loss_config(name: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("llm_distill", overrides=[f"llm/loss={name}"]).llm.loss


@functools.cache
def tokenizer():
    return char_tokenizer()


@functools.cache
def bpe_tokenizer():
    return train_bpe_tokenizer(vocab_size=400, num_prompts=CORPUS)


def random_examples(count: int = 7, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = np.random.default_rng(seed)
    eos = tokenizer().eos_token_id
    return [
        {
            "prompt": rng.integers(3, 99, rng.integers(3, 12)).tolist(),
            "completion": [*rng.integers(3, 99, rng.integers(2, 10)).tolist(), eos],
        }
        for _ in range(count)
    ]


def both_batches(examples, capacity: int = 32) -> tuple[dict, dict]:
    """(padded, packed) batches of the same examples."""
    padded = ExampleEncoder(tokenizer(), 64, None).collate(examples)
    return padded, pack_batch(padded, examples, {"": tokenizer().pad_token_id}, capacity)


def locate(batch: Batch, prefix: str = "") -> list[tuple[int, int, int]]:
    """``(row, start, stop)`` of every example of a batch, in example order (packed: matched by content)."""
    if f"{prefix}position_ids" not in batch:
        mask = batch[f"{prefix}attention_mask"]
        return [(row, 0, int(mask[row].sum())) for row in range(mask.shape[0])]
    return [
        (row, start, stop)
        for row, ranges in enumerate(example_ranges(batch[f"{prefix}position_ids"], batch[f"{prefix}attention_mask"]))
        for start, stop in ranges
    ]


def by_content(padded: Batch, packed: Batch) -> list[tuple[int, int, int]]:
    """The packed location of each padded example (their token ids match)."""
    places = locate(packed)
    contents = [packed["input_ids"][r, a:b].tolist() for r, a, b in places]
    return [places[contents.index(padded["input_ids"][r, a:b].tolist())] for r, a, b in locate(padded)]


def models():
    return random_llama(vocab_size=99, hidden_size=32, num_layers=2, seed=0), random_llama(
        vocab_size=99, hidden_size=32, num_layers=2, seed=1
    )


# ------------------------------------------------------------------------------------------ layout
def test_first_fit_places_each_example_in_the_first_row_it_fits_on_every_side() -> None:
    assert first_fit([[5], [4], [3], [2]], 8) == [[0, 2], [1, 3]]
    assert first_fit([[3, 6], [3, 3], [2, 2]], 8) == [[0, 2], [1]]


def test_packed_rows_hold_each_example_whole_with_positions_from_zero() -> None:
    examples = random_examples()
    padded, packed = both_batches(examples)
    assert packed["input_ids"].shape[0] < len(examples) and packed["input_ids"].shape[1] <= 32
    assert packed["prompt_input_ids"].shape[0] == len(examples)  # prompts stay per example
    places = by_content(padded, packed)
    assert sorted(places) == sorted(locate(packed)) and len(set(places)) == len(examples)
    for (r, a, b), (row, start, stop) in zip(locate(padded), places, strict=True):
        assert torch.equal(packed["labels"][row, start:stop], padded["labels"][r, a:b])
        assert packed["position_ids"][row, start:stop].tolist() == list(range(b - a))
    assert (packed["attention_mask"].sum() == padded["attention_mask"].sum()).item()
    assert example_keys(packed) and sorted(example_keys(packed)) == sorted(example_keys(padded))


def test_a_served_teacher_is_sent_the_same_examples_packed_or_not() -> None:
    padded, packed = both_batches(random_examples())
    sent = [dict(example_batches(batch)) for batch in (padded, packed)]
    assert sent[0].keys() == sent[1].keys() and len(sent[0]) == len(random_examples())
    for key, example in sent[0].items():
        assert all(torch.equal(example[name], sent[1][key][name]) for name in ("input_ids", "attention_mask", "labels"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_no_attention_crosses_examples(attention: str) -> None:
    examples = random_examples()
    padded, packed = both_batches(examples)
    model = models()[0].eval()
    model.set_attn_implementation(attention)
    with torch.no_grad():
        hidden_padded = final_hidden_states(model, padded["input_ids"], padded["attention_mask"])
        hidden_packed = final_hidden_states(
            model, packed["input_ids"], packed["attention_mask"], packed["position_ids"]
        )
        for (r, a, b), (row, start, stop) in zip(locate(padded), by_content(padded, packed), strict=True):
            torch.testing.assert_close(hidden_packed[row, start:stop], hidden_padded[r, a:b], atol=TOL, rtol=0)
        # changing one example's tokens leaves every other example of its row exactly as it was
        row, start, stop = locate(packed)[0]
        changed = packed["input_ids"].clone()
        changed[row, start:stop] = 3
        after = final_hidden_states(model, changed, packed["attention_mask"], packed["position_ids"])
    others = [(r, a, b) for r, a, b in locate(packed) if r == row and a != start]
    assert others
    for r, a, b in others:
        assert torch.equal(after[r, a:b], hidden_packed[r, a:b])
    assert not torch.allclose(after[row, start:stop], hidden_packed[row, start:stop])


def test_a_model_that_attends_across_packed_examples_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _, packed = both_batches(random_examples())
    student, teacher = models()
    module = TokenKD(
        student=student, teacher=teacher, loss=instantiate(loss_config("forward_kl")), optimizer=torch.optim.AdamW
    )
    module.check_heads(packed)  # both models keep attention within each example
    assert module.heads_checked == {"llm.student.model", "llm.teacher.model"}
    # an attention path that ignores position-id packing (one causal sequence per row) is caught
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", lambda position_ids: None)
    module.heads_checked.clear()
    with pytest.raises(ConfigError, match=r"llm.data.packing=true: llm.student.model attends across"):
        module.check_heads(packed)


# ------------------------------------------------------------------------------------ equal losses
def one_token(labels: Tensor, position: int) -> Tensor:
    """``labels`` with only the flat next-token position ``position`` left valid."""
    kept = torch.full_like(labels, IGNORE_INDEX).reshape(-1)
    kept[position + 1] = labels.reshape(-1)[position + 1]
    return kept.reshape(labels.shape)


def per_token_losses(loss, student, batch: Batch, teacher_kwargs: dict, source: TokenSource) -> tuple[list, Tensor]:
    """Per valid token (loss order) its loss, and the whole batch's total (with its graph)."""
    hidden = final_hidden_states(student, *sequence_inputs(batch))
    head = student.get_output_embeddings()
    total = loss(hidden, head, batch["labels"], source=source, **teacher_kwargs).total
    _, positions = next_token_targets(batch["labels"])
    losses = []
    with torch.no_grad():
        for j, position in enumerate(positions.tolist()):
            kwargs = dict(teacher_kwargs)
            if "teacher_topk" in kwargs:
                kwargs["teacher_topk"] = SparseTeacher(*(column[j : j + 1] for column in kwargs["teacher_topk"]))
            losses.append(loss(hidden, head, one_token(batch["labels"], position), source=source, **kwargs).total)
    return losses, total


def tokens_by_example(batch: Batch, places: list[tuple[int, int, int]], values: list) -> list[list]:
    """``values`` (one per valid token, loss order) grouped per example of ``places``."""
    _, positions = next_token_targets(batch["labels"])
    width = batch["labels"].shape[1]
    where = {position: j for j, position in enumerate(positions.tolist())}
    return [[values[where[row * width + t]] for t in range(a, b) if row * width + t in where] for row, a, b in places]


def compare(name: str, cached: bool, shift: int = 0, tmp_path: Path | None = None) -> float:
    """The largest difference, over every example's per-token losses and the student's gradients, between the
    padded and the packed batch (``shift``: the packed teacher targets moved by that many tokens)."""
    examples = random_examples()
    padded, packed = both_batches(examples)
    student, teacher = models()
    loss = instantiate(loss_config(name))
    source = TokenSource.STUDENT if name == "reverse_kl_sampled" else TokenSource.GROUND_TRUTH
    caches = {}
    if cached:
        cache = LogitCache.build(teacher, [[padded]], tmp_path, top_k=8, temperature=loss.temperature, vocab_size=99)
        caches = {"padded": {"teacher_topk": cache.lookup(padded)}, "packed": {"teacher_topk": cache.lookup(packed)}}
        if shift:
            caches["packed"]["teacher_topk"] = SparseTeacher(
                *(c.roll(shift, 0) for c in caches["packed"]["teacher_topk"])
            )
    results = {}
    for kind, batch in (("padded", padded), ("packed", packed)):
        student.zero_grad()
        if cached:
            kwargs = caches[kind]
        else:
            tokens = list(loss.teacher_tokens(batch))
            if shift and kind == "packed":
                tokens[2] = tokens[2].roll(shift, 1)  # segment boundaries off by one
            with torch.no_grad():
                kwargs = {"teacher_hidden": final_hidden_states(teacher, *tokens), "teacher_head": teacher.lm_head}
        losses, total = per_token_losses(loss, student, batch, kwargs, source)
        total.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in student.parameters()])
        places = locate(batch) if kind == "padded" else by_content(padded, packed)
        results[kind] = (tokens_by_example(batch, places, losses), grads, total.detach())
    worst = (results["padded"][1] - results["packed"][1]).abs().max().item()
    for one, other in zip(results["padded"][0], results["packed"][0], strict=True):
        assert len(one) == len(other) and one
        worst = max(worst, *((a - b).abs().item() for a, b in zip(one, other, strict=True)))
    return max(worst, (results["padded"][2] - results["packed"][2]).abs().item())


@pytest.mark.parametrize("name", TOKEN_LOSSES)
def test_packed_batch_gives_each_example_the_same_token_losses_and_gradients_with_a_live_teacher(name: str) -> None:
    assert compare(name, cached=False) < TOL


@pytest.mark.parametrize("name", [name for name in TOKEN_LOSSES if name != "reverse_kl_sampled"])
def test_packed_batch_finds_the_cached_teacher_rows_of_the_padded_batch(name: str, tmp_path: Path) -> None:
    assert compare(name, cached=True, tmp_path=tmp_path) < TOL


@pytest.mark.parametrize("cached", [False, True], ids=["live_boundaries", "cache_rows"])
def test_a_one_token_shift_of_the_teacher_targets_is_caught(cached: bool, tmp_path: Path) -> None:
    assert compare("forward_kl", cached=cached, shift=1, tmp_path=tmp_path) > 1e-3


def test_the_method_step_on_a_packed_batch_matches_the_padded_batch() -> None:
    examples = random_examples()
    padded, packed = both_batches(examples)
    student, teacher = models()
    module = TokenKD(
        student=student, teacher=teacher, loss=instantiate(loss_config("forward_kl")), optimizer=torch.optim.AdamW
    )
    totals = [module.one_loss(module.loss, batch, monitor_kl=True) for batch in (padded, packed)]
    assert torch.equal(totals[0].count, totals[1].count)
    for key in ("ce", "distill", "kl_to_teacher"):
        torch.testing.assert_close(totals[0].parts[key], totals[1].parts[key], atol=TOL, rtol=0)


# ----------------------------------------------------------------------------------- cross-tokenizer
def only_example(batch: Batch, index: int) -> dict:
    """``batch`` with the labels and spans of every example but ``index`` (both sides) switched off."""
    out = dict(batch)
    for prefix, spans in (("", "student_spans"), ("teacher_", "teacher_spans")):
        row, start, stop = locate(batch, prefix)[index]
        keep = torch.zeros_like(batch[f"{prefix}labels"], dtype=torch.bool)
        keep[row, start:stop] = True
        out[f"{prefix}labels"] = batch[f"{prefix}labels"].masked_fill(~keep, IGNORE_INDEX)
        out[spans] = batch[spans].masked_fill(~keep, -1)
    return out


def miswired(batch: Batch, name: str) -> dict:
    """A wrong packed alignment: ULD paired per row (no position ids), GOLD's spans numbered per example."""
    out = dict(batch)
    if name == "uld":
        del out["position_ids"], out["teacher_position_ids"]
        return out
    for prefix, key in (("", "student_spans"), ("teacher_", "teacher_spans")):
        spans = out[key] = batch[key].clone()
        for row, start, stop in locate(batch, prefix):
            part = spans[row, start:stop]
            if (part >= 0).any():
                part[part >= 0] -= part[part >= 0].min()
    return out


@pytest.mark.parametrize("name", ["uld", "gold"])
def test_cross_tokenizer_packing_matches_per_example_losses_and_gradients(name: str) -> None:
    teacher, student, loss, _, datamodule = cross_setup(
        bpe_tokenizer(), tokenizer(), name, system_prompt="Be brief.", max_length=200
    )
    with torch.no_grad():  # peaked distributions: a wrong pairing changes the loss visibly
        teacher.lm_head.weight.mul_(30)
        student.lm_head.weight.mul_(10)
    datamodule.setup()
    examples = datamodule.splits["train"][:5]
    padded = datamodule.collate(examples)
    datamodule.pack_length = 400
    packed = datamodule.collate(examples)
    assert packed["input_ids"].shape[0] < len(examples) and packed["teacher_input_ids"].shape[0] < len(examples)
    # both sides hold the same examples in the same rows and order; packed index of each example:
    assert [p[0] for p in locate(packed)] == [p[0] for p in locate(packed, "teacher_")]
    orders = {
        "padded": list(range(len(examples))),
        "packed": [locate(packed).index(p) for p in by_content(padded, packed)],
    }

    def run(batch: Batch, order: list[int], wrong: bool = False) -> tuple[Tensor, Tensor]:
        """Per example its loss, then the batch's; the student's gradient."""
        student.zero_grad()
        hidden = final_hidden_states(student, *sequence_inputs(batch))
        with torch.no_grad():
            teacher_hidden = final_hidden_states(teacher, *loss.teacher_tokens(batch))
        head = student.get_output_embeddings()

        def total(rows: Batch) -> Tensor:
            rows = miswired(rows, name) if wrong else rows
            return loss(hidden, head, rows["labels"], teacher_hidden, teacher.lm_head, **loss.alignment(rows)).total

        whole = total(batch)
        whole.backward()
        with torch.no_grad():
            each = [total(only_example(batch, i)) for i in order]
        return torch.stack([*each, whole.detach()]), torch.cat([p.grad.reshape(-1) for p in student.parameters()])

    losses, grads = run(padded, orders["padded"])
    packed_losses, packed_grads = run(packed, orders["packed"])
    assert (losses > 0).all()
    torch.testing.assert_close(packed_losses, losses, atol=TOL, rtol=0)
    torch.testing.assert_close(packed_grads, grads, atol=TOL, rtol=0)
    wrong_losses, _ = run(packed, orders["packed"], wrong=True)
    assert (wrong_losses - losses).abs().max() > 10 * TOL


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("options", "message"),
    [({"prompt_only": True}, "llm.data.packing"), ({"pack_length": 8}, "llm.data.pack_length")],
    ids=["prompt_only", "short_pack_length"],
)
def test_packing_refuses_what_it_cannot_pack(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LLMDataModule(tokenizer(), train_prompts={"kind": "arithmetic"}, max_length=64, packing=True, **options)
