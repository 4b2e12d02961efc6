"""Token divergences against NumPy references, and the chunked token loss against a naive full-logit one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import (
    DIVERGENCES,
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewKL,
    SkewReverseKL,
    TotalVariation,
)
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import SparseTeacher, next_token_targets

T = 2.0


# ------------------------------------------------------------------------------ NumPy references
def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array(
        [
            sum(pi * np.log(pi / qi) for pi, qi in zip(pr, qr, strict=True) if pi > 0)
            for pr, qr in zip(p, q, strict=True)
        ]
    )


def reference(name: str, s: np.ndarray, t: np.ndarray, param: float) -> np.ndarray:
    """Per-token divergence of student probs ``s`` and teacher probs ``t`` from the papers' definitions."""
    if name == "forward_kl":
        return kl(t, s)
    if name == "reverse_kl":
        return kl(s, t)
    if name == "jsd":
        m = param * t + (1 - param) * s
        return param * kl(t, m) + (1 - param) * kl(s, m)
    if name == "skl":
        return kl(t, param * t + (1 - param) * s)
    if name == "srkl":
        return kl(s, param * s + (1 - param) * t)
    return 0.5 * np.abs(t - s).sum(axis=-1)


PARAMS = {"jsd": {"beta": 0.3}, "skl": {"alpha": 0.1}, "srkl": {"alpha": 0.2}}


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_divergence_matches_reference(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 11, generator=g) * 3, torch.randn(6, 11, generator=g) * 3
    kwargs = PARAMS.get(name, {})
    value = DIVERGENCES[name](temperature=T, **kwargs)(student, teacher)
    assert value.shape == (6,) and value.dtype == torch.float32
    s, t = softmax(student.double().numpy() / T), softmax(teacher.double().numpy() / T)
    expected = T**2 * reference(name, s, t, next(iter(kwargs.values()), 0.0))
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_divergences_accept_teacher_log_probs_and_low_precision() -> None:
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(4, 9, generator=g), torch.randn(4, 9, generator=g)
    for cls in DIVERGENCES.values():
        div = cls(temperature=T)
        torch.testing.assert_close(div(student, F.log_softmax(teacher, -1)), div(student, teacher))
        assert div(student.bfloat16(), teacher.bfloat16()).dtype == torch.float32


def test_jsd_end_points_are_forward_and_reverse_kl() -> None:
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(5, 13, generator=g), torch.randn(5, 13, generator=g)
    torch.testing.assert_close(GeneralizedJSD(beta=0.0)(student, teacher), ForwardKL()(student, teacher))
    torch.testing.assert_close(GeneralizedJSD(beta=1.0)(student, teacher), ReverseKL()(student, teacher))
    torch.testing.assert_close(SkewKL(alpha=0.0)(student, teacher), ForwardKL()(student, teacher))
    torch.testing.assert_close(SkewReverseKL(alpha=0.0)(student, teacher), ReverseKL()(student, teacher))
    for cls in DIVERGENCES.values():  # every divergence is 0 between equal distributions
        torch.testing.assert_close(cls()(teacher, teacher), torch.zeros(5), atol=1e-6, rtol=0)


def test_divergences_survive_zero_probabilities() -> None:
    """0 log 0 = 0 in values and gradients; only KL towards a zero where the other side has mass is infinite."""
    zeros = torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]])
    full = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    finite_orders = {
        ForwardKL: [(full, zeros)],
        ReverseKL: [(zeros, full)],
        TotalVariation: [(full, zeros), (zeros, full)],
    }
    for cls in (GeneralizedJSD, SkewKL, SkewReverseKL):
        finite_orders[cls] = [(full, zeros), (zeros, full)]
    for cls, orders in finite_orders.items():
        for student, teacher in orders:
            student = student.clone().requires_grad_()
            value = cls().per_token(student, teacher)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(student.grad).all(), cls.__name__
    assert torch.isinf(ForwardKL().per_token(zeros, full)).all()


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda: GeneralizedJSD(beta=1.5), "beta"),
        (lambda: SkewKL(alpha=1.0), "alpha"),
        (lambda: ForwardKL(temperature=0.0), "temperature"),
        (lambda: TokenDistillationLoss(ForwardKL(), alpha=2.0), "alpha"),
        (lambda: TokenDistillationLoss(ForwardKL(), chunk_size=0), "chunk_size"),
    ],
)
def test_bad_settings_name_the_key(make, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        make()


# ----------------------------------------------------------------------- chunked vs naive loss
B, L, H, V = 3, 9, 8, 17


def naive_loss(name, alpha, hidden, head, labels, teacher_logits, param=0.0) -> tuple[torch.Tensor, int]:
    """Full logits [B, L, V], shifted, masked, softmaxed: the textbook implementation (sum, count)."""
    logits = head(hidden)[:, :-1]
    targets, teacher = labels[:, 1:], teacher_logits[:, :-1]
    valid = targets != -100
    ce = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    s, t = F.softmax(logits[valid] / T, -1), F.softmax(teacher[valid] / T, -1)
    if name == "forward_kl":
        div = (t * (t.log() - s.log())).sum(-1)
    elif name == "reverse_kl":
        div = (s * (s.log() - t.log())).sum(-1)
    elif name == "jsd":
        m = param * t + (1 - param) * s
        div = param * (t * (t.log() - m.log())).sum(-1) + (1 - param) * (s * (s.log() - m.log())).sum(-1)
    elif name == "skl":
        div = (t * (t.log() - (param * t + (1 - param) * s).log())).sum(-1)
    elif name == "srkl":
        div = (s * (s.log() - (param * s + (1 - param) * t).log())).sum(-1)
    else:
        div = 0.5 * (t - s).abs().sum(-1)
    return (1 - alpha) * ce + alpha * T**2 * div.sum(), int(valid.sum())


def make_inputs(seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=g, dtype=dtype, requires_grad=True)
    head = nn.Linear(H, V, bias=True).to(dtype)
    teacher_head = nn.Linear(H, V, bias=False).to(dtype)
    teacher_hidden = torch.randn(B, L, H, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, 6:] = -100  # padding
    labels[2, :2] = -100
    return hidden, head, teacher_hidden, teacher_head, labels


def grads(*tensors: torch.Tensor) -> list[torch.Tensor]:
    out = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
@pytest.mark.parametrize("chunk_size", [4, 7, None])
def test_chunked_loss_equals_naive(name: str, chunk_size: int | None) -> None:
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs()
    kwargs = PARAMS.get(name, {})
    loss = TokenDistillationLoss(DIVERGENCES[name](temperature=T, **kwargs), alpha=0.7, chunk_size=chunk_size)
    out = loss(hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    (out.total / out.count).backward()
    got = grads(hidden, head.weight, head.bias)
    param = next(iter(kwargs.values()), 0.0)
    expected, count = naive_loss(name, 0.7, hidden, head, labels, teacher_head(teacher_hidden).detach(), param)
    (expected / count).backward()
    assert int(out.count) == count == 17
    torch.testing.assert_close(out.total, expected, rtol=1e-9, atol=1e-9)
    for a, b in zip(got, grads(hidden, head.weight, head.bias), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert teacher_head.weight.grad is None


def test_chunked_loss_float32_and_teacher_logits_input() -> None:
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs(seed=3, dtype=torch.float32)
    loss = TokenDistillationLoss(ReverseKL(temperature=T), alpha=0.5, chunk_size=5)
    out = loss(hidden, head, labels, teacher_logits=teacher_head(teacher_hidden).detach(), monitor_kl=True)
    out.total.backward()
    got = grads(hidden, head.weight)
    expected, _ = naive_loss("reverse_kl", 0.5, hidden, head, labels, teacher_head(teacher_hidden).detach())
    expected.backward()
    torch.testing.assert_close(out.total, expected, rtol=1e-5, atol=1e-5)
    for a, b in zip(got, grads(hidden, head.weight), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    valid = labels[:, 1:] != -100
    student_log_p = F.log_softmax(head(hidden)[:, :-1][valid], -1)
    teacher_log_p = F.log_softmax(teacher_head(teacher_hidden)[:, :-1][valid], -1)
    kl_sum = (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum()  # forward KL at T = 1
    torch.testing.assert_close(out.parts["kl_to_teacher"], kl_sum.detach(), rtol=1e-5, atol=1e-5)


def test_next_token_shift() -> None:
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    targets, positions = next_token_targets(labels)
    # position t predicts labels[t + 1]: row 0 positions 1, 2; row 1 positions 0..3 (flat 5..8)
    assert positions.tolist() == [1, 2, 5, 6, 7, 8]
    assert targets.reshape(-1)[positions].tolist() == [5, 6, 7, 8, 9, 10]


def test_sums_normalise_across_micro_batches() -> None:
    """Gradient accumulation: (sum_1 + sum_2) / (count_1 + count_2) equals the loss of the joined batch."""
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs()
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, chunk_size=4)
    parts = [
        loss(hidden[i], head, labels[i], teacher_hidden=teacher_hidden[i], teacher_head=teacher_head)
        for i in ([0], [1, 2])
    ]
    whole = loss(hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    assert [int(p.count) for p in parts] == [5, 12]
    joined = sum(p.total for p in parts) / sum(p.count for p in parts)
    torch.testing.assert_close(joined, whole.total / whole.count)
    mean_of_means = sum(p.total / p.count for p in parts) / 2
    assert not torch.allclose(mean_of_means, whole.total / whole.count)  # why sums are returned


def test_padded_vocabulary_is_sliced_to_the_shared_size() -> None:
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs()
    padded_student, padded_teacher = nn.Linear(H, V + 7).double(), nn.Linear(H, V + 3, bias=False).double()
    with torch.no_grad():
        padded_student.weight[:V], padded_student.bias[:V] = head.weight, head.bias
        padded_teacher.weight[:V] = teacher_head.weight
    loss = TokenDistillationLoss(GeneralizedJSD(beta=0.5), alpha=0.5, chunk_size=4, vocab_size=V)
    padded = loss(hidden, padded_student, labels, teacher_hidden=teacher_hidden, teacher_head=padded_teacher)
    plain = loss(hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
    torch.testing.assert_close(padded.total, plain.total)
    padded.total.backward()
    assert padded_student.weight.grad[V:].abs().sum() == 0


def test_vocabulary_mismatch_is_a_config_error() -> None:
    hidden, head, teacher_hidden, _, labels = make_inputs()
    other = nn.Linear(H, V + 5).double()
    with pytest.raises(ConfigError, match=r"llm\.loss\.vocab_size"):
        TokenDistillationLoss(ForwardKL())(hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=other)
    with pytest.raises(ConfigError, match="exceeds"):
        TokenDistillationLoss(ForwardKL(), vocab_size=V + 1)(
            hidden, head, labels, teacher_hidden=teacher_hidden, teacher_head=other
        )
    with pytest.raises(ConfigError, match="outside the shared vocabulary"):
        TokenDistillationLoss(ForwardKL(), alpha=0.0, vocab_size=5)(hidden, head, labels.clamp(max=V - 1))


def test_no_valid_token_gives_a_zero_loss_with_a_graph() -> None:
    hidden, head, *_ = make_inputs()
    out = TokenDistillationLoss(ForwardKL(), alpha=0.0)(hidden, head, torch.full((B, L), -100))
    out.total.backward()
    assert int(out.count) == 0 and float(out.total.detach()) == 0.0 and hidden.grad.abs().sum() == 0


def top_k_teacher(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int) -> SparseTeacher:
    _, positions = next_token_targets(labels)
    log_p = F.log_softmax(teacher_logits.reshape(-1, V)[positions] / T, -1)
    top, ids = log_p.topk(k, dim=-1)
    tail = torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=-1)
    return SparseTeacher(ids, top.half().float(), tail)


@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_top_k_teacher_compares_k_plus_one_buckets(name: str) -> None:
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs(seed=4)
    teacher_logits = teacher_head(teacher_hidden).detach()
    k = 5
    sparse = top_k_teacher(teacher_logits, labels, k)
    div = DIVERGENCES[name](temperature=T, **PARAMS.get(name, {}))
    out = TokenDistillationLoss(div, alpha=1.0, chunk_size=3)(hidden, head, labels, teacher_topk=sparse)
    out.total.backward()
    assert hidden.grad.abs().sum() > 0
    # reference: NumPy buckets (teacher top-k probabilities + tail; the student's mass on the same ids + rest)
    _, positions = next_token_targets(labels)
    s = softmax(head(hidden).detach().reshape(-1, V)[positions].numpy() / T)
    ids = sparse.ids.numpy()
    s_buckets = np.concatenate(
        [np.take_along_axis(s, ids, 1), 1 - np.take_along_axis(s, ids, 1).sum(1, keepdims=True)], 1
    )
    t_buckets = np.exp(np.concatenate([sparse.log_probs.numpy(), sparse.tail.numpy()[:, None]], 1).astype(np.float64))
    t_buckets /= t_buckets.sum(1, keepdims=True)
    expected = T**2 * reference(name, s_buckets, t_buckets, PARAMS.get(name, {}).get("beta", 0.0)).sum()
    # float32 loss vs a float64 reference: rounding alone reaches ~1e-6 relative (seen in CI: 1.08e-6)
    np.testing.assert_allclose(float(out.total.detach()), expected, rtol=1e-5)


def test_top_k_with_one_token_left_out_is_the_full_divergence() -> None:
    hidden, head, teacher_hidden, teacher_head, labels = make_inputs(seed=5)
    teacher_logits = teacher_head(teacher_hidden).detach()
    sparse = top_k_teacher(teacher_logits, labels, V - 1)
    sparse = sparse._replace(
        log_probs=F.log_softmax(teacher_logits.reshape(-1, V)[next_token_targets(labels)[1]] / T, -1).gather(
            1, sparse.ids
        )
    )
    loss = TokenDistillationLoss(ForwardKL(temperature=T), alpha=0.5, chunk_size=4)
    bucketed = loss(hidden, head, labels, teacher_topk=sparse)
    full = loss(hidden, head, labels, teacher_logits=teacher_logits)
    torch.testing.assert_close(bucketed.total, full.total)
