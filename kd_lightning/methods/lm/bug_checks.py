"""Known KD bugs, caught on one batch through a method's own loss and teacher before training (the
model-side half of ``kd-llm-distill``'s pre-flight, ``llm.preflight``; the data side is
:mod:`kd_lightning.recipes.llm_bug_checks`).

Each check runs ``method.loss`` the way :meth:`LMMethod.one_loss` does, on a student whose hidden states are
given, and reads the gradient per position of those hidden states: a position's loss depends on the
teacher's distribution there exactly when its gradient does. The distillation term is isolated by calling
the loss with ``source=student`` (no shipped loss lets cross-entropy read the student's own tokens, which
:func:`check_ce_on_samples` verifies first). A failed check raises one :class:`ConfigError` naming the cause
and the fix.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.protocol import TokenSource, batch_source
from kd_lightning.llm.tokens import (
    IGNORE_INDEX,
    SparseTeacher,
    final_hidden_states,
    next_token_targets,
    sequence_inputs,
)

Batch = Mapping[str, Any]
#: The largest per-token divergence of a distribution with itself in bfloat16 (nats): beyond it the loss has a
#: floor that hides what the student still has to learn (a loss that upcasts gives 0 up to float32 rounding;
#: one that runs log_softmax in bfloat16 exceeds it: tests/test_llm_preflight_bugs.py).
BF16_FLOOR = 1e-4
#: Per-token distillation loss / gradient (relative to the student's) taken as zero for student == teacher.
ZERO = 1e-4
SKIP = " (skip all pre-flight checks: llm.preflight=false)"


def fail(check: str, cause: str, fix: str) -> ConfigError:
    """The one-line error of a failed check."""
    return ConfigError(f"pre-flight ({check}): {cause}; {fix}{SKIP}")


class Probe:
    """A method seen by the checks: its attributes, with the teacher's outputs, the teacher's and the
    student's final hidden states computed once per batch (the checks run each batch several times)."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.memo: dict[tuple[str, int], tuple[Tensor, Any]] = {}  # keeps each batch's tensor: ids stay unique

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["method"], name)

    def once(self, kind: str, batch: Batch, compute: Any) -> Any:
        """``compute()`` (without gradient) the first time ``kind`` is asked for ``batch``'s tokens."""
        key = (kind, id(batch["input_ids"]))
        if key not in self.memo:
            with torch.no_grad():
                self.memo[key] = (batch["input_ids"], compute())
        return self.memo[key][1]

    def teacher_outputs(self, loss: Any, batch: Batch, monitor_kl: bool) -> dict[str, Any]:
        return self.once("teacher", batch, lambda: self.method.teacher_outputs(loss, batch, monitor_kl))

    def student_hidden(self, batch: Batch) -> Tensor:
        return self.once("student", batch, lambda: final_hidden_states(self.method.student, *sequence_inputs(batch)))

    def teacher_hidden(self, batch: Batch) -> Tensor:
        tokens = self.method.loss.teacher_tokens(batch)
        return self.once("teacher_hidden", batch, lambda: final_hidden_states(self.method.teacher, *tokens))


def loss_sums(method: Any, batch: Batch, hidden: Tensor, source: TokenSource, **overrides: Any) -> Any:
    """``method.loss`` on ``batch`` for a student with final hidden states ``hidden`` (its own head unless
    ``student_head`` is given), the teacher as ``method.teacher_outputs`` gives it unless overridden."""
    loss = method.loss
    head = overrides.pop("student_head", None) or method.student.get_output_embeddings()
    teacher = {**method.teacher_outputs(loss, batch, False), **overrides}
    return loss(hidden, head, batch["labels"], monitor_kl=False, source=source, **teacher)


def position_grads(method: Any, batch: Batch, hidden: Tensor, source: TokenSource, **overrides: Any) -> Tensor:
    """``[B, T]``: the size of the loss's gradient with respect to each position's student hidden state."""
    leaf = hidden.detach().float().requires_grad_()
    total = loss_sums(method, batch, leaf, source, **overrides).total
    (grad,) = torch.autograd.grad(total, leaf, allow_unused=True)
    return torch.zeros_like(leaf[..., 0]) if grad is None else grad.abs().amax(dim=-1)


def student_hidden(method: Any, batch: Batch) -> Tensor:
    """The student's final hidden states on ``batch`` (once per batch through a :class:`Probe`)."""
    if isinstance(method, Probe):
        return method.student_hidden(batch)
    with torch.no_grad():
        return final_hidden_states(method.student, *sequence_inputs(batch))


def distill_source(loss: Any) -> TokenSource:
    """The source under which only the distillation term trains (every shipped term reads student samples)."""
    return TokenSource.STUDENT if TokenSource.STUDENT in loss.reads.get("distill", ()) else TokenSource.GROUND_TRUTH


def valid_positions(labels: Tensor) -> Tensor:
    """``[B, T]`` bool: positions whose next-token target is labelled."""
    return next_token_targets(labels)[0] != IGNORE_INDEX


def check_ce_on_samples(method: Any, batch: Batch) -> None:
    """(f) Cross-entropy on the student's own samples trains it to imitate itself: a batch marked
    ``token_source=student`` must give ``ce`` 0."""
    sampled = {**batch, "token_source": TokenSource.STUDENT.value}
    out = loss_sums(method, sampled, student_hidden(method, batch), batch_source(sampled))
    ce = float(out.parts.get("ce", torch.zeros(())))
    if ce != 0.0:
        raise fail(
            "ce_on_samples",
            f"the loss applies cross-entropy ({ce / max(int(out.count), 1):.4g} per token) to tokens the student "
            f"sampled itself ({type(method.loss).__name__}.reads['ce'] includes 'student')",
            "let its ce term read ground-truth and teacher tokens only (kd_lightning.llm.protocol.SUPERVISED_SOURCES)",
        )


def check_masked_positions(method: Any, batch: Batch) -> None:
    """(c) No prompt or padding position enters the loss: changing the student's hidden states at every
    position whose next token is unlabelled (-100) leaves every gradient where it was."""
    hidden, source = student_hidden(method, batch), batch_source(batch)
    masked = ~valid_positions(batch["labels"])
    noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0)).to(hidden)
    moved = torch.where(masked[..., None], hidden + noise, hidden)
    before = loss_sums(method, batch, hidden, source).total.detach()
    after = loss_sums(method, batch, moved, source).total.detach()
    if not torch.allclose(before, after, rtol=1e-5, atol=1e-6):
        raise fail(
            "masked_positions",
            f"the loss changes ({float(before):.6g} -> {float(after):.6g}) when only prompt/padding positions "
            "(labels -100) change: it reads positions its labels mask (masked by attention_mask instead of labels?)",
            "select the loss's tokens by labels != -100 (kd_lightning.llm.tokens.next_token_targets)",
        )


def check_padded_vocab(method: Any, batch: Batch, vocab: int) -> None:
    """(d) A head padded beyond the tokenizer's ``vocab`` ids: its extra rows must not enter the loss."""
    head = method.student.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.weight.shape[0] <= vocab:
        return
    moved = copy.deepcopy(head).requires_grad_(False)
    moved.weight[vocab:] += 1.0
    hidden, source = student_hidden(method, batch), batch_source(batch)
    before = loss_sums(method, batch, hidden, source).total.detach()
    after = loss_sums(method, batch, hidden, source, student_head=moved).total.detach()
    if not torch.allclose(before, after, rtol=1e-5, atol=1e-6):
        raise fail(
            "padded_vocab",
            f"the student's head has {head.weight.shape[0]} rows for a {vocab}-token tokenizer and the loss "
            f"reads the padding rows (llm.loss.vocab_size={getattr(method.loss, 'vocab_size', None)})",
            f"set llm.loss.vocab_size={vocab}",
        )


def check_alignment(method: Any, batch: Batch, vocab: int) -> None:
    """(b) Teacher and student distributions are aligned position by position: planting another input token
    at a completion position ``j`` of a row must change the teacher's term at position ``j`` and nowhere but the
    valid positions ``>= j`` of that row's example (the ones that can read it), with the student's hidden states
    held fixed. Later positions need not all change: a loss that reads one teacher log-prob per position (e.g.
    of a sampled token) can be unmoved by a token far back."""
    valid = valid_positions(batch["labels"])
    counts = (batch["labels"] != IGNORE_INDEX).sum(dim=1)
    if int(counts.max()) < 3:  # no completion of 3 tokens to plant into
        return
    row = int((counts >= 3).nonzero()[0])
    j = int((batch["labels"][row] != IGNORE_INDEX).nonzero()[1])
    planted = {key: value.clone() if isinstance(value, Tensor) else value for key, value in batch.items()}
    planted["input_ids"][row, j] = (int(batch["input_ids"][row, j]) + 1) % vocab
    hidden, source = student_hidden(method, batch), distill_source(method.loss)
    changed = (position_grads(method, planted, hidden, source) - position_grads(method, batch, hidden, source)).abs()
    changed = changed > 1e-4 * float(changed.max().clamp(min=1e-12))
    expected = torch.zeros_like(valid)
    stop = valid.shape[1]
    if "position_ids" in batch:  # packed: the planted token's example ends where positions restart
        stop = j + int(batch["position_ids"][row, j:].ne(0).cumprod(0).sum())
    expected[row, j:stop] = valid[row, j:stop]
    if bool(changed[row, j]) and not bool((changed & ~expected).any()):
        return
    seen = changed[row]
    where = "one position ahead of" if bool(seen[j - 1]) else "behind" if not bool(seen[j]) else "off"
    if torch.cat([changed[:row], changed[row + 1 :]]).any():
        where = "mixed across rows with"
    raise fail(
        "alignment",
        f"a token planted at position {j} of row {row} changed the teacher's term at positions "
        f"{seen.nonzero().squeeze(1).tolist()} (expected {expected[row].nonzero().squeeze(1).tolist()}): the "
        f"teacher's distributions are {where} the student's",
        "give the loss teacher outputs at the student's positions (output t predicts labels[t + 1] on both sides)",
    )


def check_identity(method: Any, batch: Batch) -> None:
    """(a) student == teacher gives distillation loss 0 and gradient 0: the teacher's own hidden states and
    head as the student."""
    loss = method.loss
    if isinstance(method, Probe):
        hidden = method.teacher_hidden(batch)
    else:
        with torch.no_grad():
            hidden = final_hidden_states(method.teacher, *loss.teacher_tokens(batch))
    source, head = distill_source(loss), method.teacher.get_output_embeddings()
    leaf = hidden.detach().float().requires_grad_()
    out = loss_sums(method, batch, leaf, source, student_head=head)
    tokens = max(int(out.count), 1)
    (grad,) = torch.autograd.grad(out.total, leaf, allow_unused=True)
    reference = float(position_grads(method, batch, student_hidden(method, batch), source).max())
    value = float(out.parts["distill"]) / tokens
    size = 0.0 if grad is None else float(grad.abs().max())
    if abs(value) > ZERO or size > ZERO * max(reference, 1e-12):
        raise fail(
            "identity",
            f"with the teacher itself as the student the distillation loss is {value:.3g} per token and its "
            f"gradient {size:.3g} (the real student's: {reference:.3g}); it must be 0: the teacher outputs the loss "
            "is given are not lm_head(final hidden state) of the teacher on the student's tokens (another layer, "
            "a scale, a temperature on one side only?)",
            "give the loss the teacher's final hidden states and lm_head (LMMethod.teacher_outputs)",
        )


def check_bf16_floor(method: Any, batch: Batch) -> None:
    """(e) The divergence of the student's distribution with itself through the run's loss, its logits in
    bfloat16 on both sides, is below :data:`BF16_FLOOR` nats per token (else the loss must upcast to float32);
    in float32 it is 0 (:func:`check_identity` for the loss alone: also runs with a top-k cache or a server)."""
    head = method.student.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return
    hidden = student_hidden(method, batch)
    exact = self_divergence(method, batch, hidden, copy.deepcopy(head).float().requires_grad_(False))
    if abs(exact) > ZERO:
        raise fail(
            "identity",
            f"the distillation loss of the student's distribution with itself is {exact:.3g} per token; it must be 0: "
            "the divergence does not vanish at p_s = p_t (a cross-entropy to soft targets?)",
            "use a divergence from kd_lightning.llm.divergences, both sides at llm.loss.divergence.temperature",
        )
    half = copy.deepcopy(head).to(torch.bfloat16).requires_grad_(False)
    floor = self_divergence(method, batch, hidden.to(torch.bfloat16), half)
    if abs(floor) > BF16_FLOOR:
        raise fail(
            "bf16_floor",
            f"the loss of identical bfloat16 logits is {floor:.3g} nats per token (> {BF16_FLOOR}): the divergence "
            "is computed in bfloat16",
            "upcast logits to float32 before log_softmax (kd_lightning.losses.precision.at_least_fp32)",
        )


def self_divergence(method: Any, batch: Batch, hidden: Tensor, head: nn.Module) -> float:
    """The per-token distillation term of ``method.loss`` with ``hidden`` and ``head`` on both sides."""
    loss, teacher = method.loss, {"teacher_hidden": hidden, "teacher_head": head}
    out = loss(hidden, head, batch["labels"], monitor_kl=False, source=distill_source(loss), **teacher)
    return float(out.parts["distill"]) / max(int(out.count), 1)


def check_topk_rows(rows: SparseTeacher, vocab: int) -> None:
    """(h) Cached / served top-k rows are log-probabilities of the full softmax: the ``k`` probabilities sum
    to at most 1, with the rest in the tail (a softmax over the ``k`` alone leaves no tail mass)."""
    top = torch.logsumexp(rows.log_probs.float(), dim=1)
    total = torch.logsumexp(torch.cat([rows.log_probs, rows.tail[:, None]], dim=1).float(), dim=1)
    k = rows.ids.shape[1]
    cause = None
    if float(top.max()) > 1e-2 or float(total.abs().max()) > 1e-2:
        cause = f"their probabilities sum to {float(total.exp().max()):.4g} (top-k alone: {float(top.exp().max()):.4g})"
    elif k < vocab and rows.ids.shape[0] > 1 and float(rows.tail.exp().max()) < 1e-6:
        cause = "no row keeps any tail mass although k < vocabulary: a softmax over the top k alone"
    if cause:
        raise fail(
            "topk_softmax",
            f"the teacher's top-{k} rows are not log-probs of its full softmax: {cause}",
            "take log_softmax over the whole vocabulary, then the top k, and store the rest as the tail "
            "(rebuild the logit cache)",
        )
