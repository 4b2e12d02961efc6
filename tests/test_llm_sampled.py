"""Sampled-token on-policy KD (``llm/loss=reverse_kl_sampled``): the score-function estimator's gradient
against the closed-form reverse-KL gradient, the k1 / k3 values against a hand-computed example, the
declarations, and one ``kd-llm-distill`` run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.protocol import TokenLoss, TokenSource
from kd_lightning.llm.sampled import SampledReverseKL
from tests.test_cli import run

#: Monte-Carlo tolerance: the averaged gradient must lie within this many standard errors of the exact one.
MC_SIGMAS = 5.0


def identity_head(vocab: int) -> nn.Linear:
    """``lm_head`` with weight I: the logits are the hidden states, so d loss / d hidden = d loss / d logits."""
    head = nn.Linear(vocab, vocab, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.eye(vocab, dtype=head.weight.dtype))
    return head


def one_position_batch(student: torch.Tensor, teacher: torch.Tensor, tokens: torch.Tensor):
    """Rows of two positions: position 0 holds the logits, position 1 the sampled token (its label)."""
    n, vocab = tokens.numel(), student.numel()
    hidden = torch.zeros(n, 2, vocab, dtype=torch.float64)
    hidden[:, 0] = student
    hidden.requires_grad_(True)
    teacher_logits = torch.zeros(n, 2, vocab, dtype=torch.float64)
    teacher_logits[:, 0] = teacher
    labels = torch.full((n, 2), -100)
    labels[:, 1] = tokens
    return hidden, teacher_logits, labels


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_gradient_averaged_over_samples_matches_the_exact_reverse_kl_gradient(temperature: float) -> None:
    vocab, n = 5, 20_000
    gen = torch.Generator().manual_seed(0)
    z_s = torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5
    z_t = torch.randn(vocab, generator=gen, dtype=torch.float64) * 1.5
    p = torch.softmax(z_s / temperature, dim=0)
    q = torch.softmax(z_t / temperature, dim=0)
    tokens = torch.multinomial(p, n, replacement=True, generator=gen)  # samples from the student at T
    hidden, teacher_logits, labels = one_position_batch(z_s, z_t, tokens)
    loss = SampledReverseKL(temperature=temperature, chunk_size=4096)  # several chunks, recomputed in backward
    out = loss(hidden, identity_head(vocab), labels, teacher_logits=teacher_logits, source=TokenSource.STUDENT)
    out.total.backward()
    per_sample = hidden.grad[:, 0]  # [n, V]: each sample's gradient w.r.t. the student's logits
    mean, se = per_sample.mean(0), per_sample.std(0) / math.sqrt(n)

    # Closed form: KL(p || q) = sum_v p_v d_v, d = log p - log q, p = softmax(z / T);
    # d/dz_j [T^2 KL] = T^2 * (1 / T) * p_j (d_j - KL)
    d = p.log() - q.log()
    kl = (p * d).sum()
    exact = temperature * p * (d - kl)
    assert (mean - exact).abs().max() <= MC_SIGMAS * se.max(), (mean, exact, se)
    assert se.max() < 0.05 * exact.abs().max()  # the tolerance is tight enough to catch a wrong formula
    # Its value: k3's average estimates the same reverse KL (T^2 KL), within the same tolerance.
    log_r = (q.log() - p.log())[tokens]
    k3 = (torch.expm1(log_r) - log_r) * temperature**2
    assert float(out.total.detach()) / n == pytest.approx(float(k3.mean()), rel=1e-6)
    assert abs(float(out.total.detach()) / n - temperature**2 * float(kl)) <= MC_SIGMAS * float(k3.std()) / math.sqrt(n)


def test_teacher_token_log_probs_alone_give_the_same_loss_and_gradient() -> None:
    """What a served teacher can supply (log p_t of each sampled token) is all the loss needs."""
    vocab = 5
    gen = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(vocab, generator=gen, dtype=torch.float64), torch.randn(vocab, generator=gen)
    tokens = torch.multinomial(torch.softmax(z_s, 0), 64, replacement=True, generator=gen)
    loss, head = SampledReverseKL(estimator="k1", chunk_size=16), identity_head(vocab)
    grads, totals = [], []
    for served in (False, True):
        hidden, teacher_logits, labels = one_position_batch(z_s, z_t.double(), tokens)
        teacher = {"teacher_logits": teacher_logits}
        if served:
            teacher = {"teacher_token_log_probs": torch.log_softmax(z_t.double(), 0)[tokens]}
        out = loss(hidden, head, labels, source=TokenSource.STUDENT, **teacher)
        out.total.backward()
        grads.append(hidden.grad)
        totals.append(float(out.total.detach()))
    assert totals[0] == pytest.approx(totals[1], rel=1e-9)
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(("estimator", "expected"), [("k1", 0.0), ("k3", 0.5)])
def test_k1_and_k3_values_of_a_hand_computed_example(estimator: str, expected: float) -> None:
    # Two sampled tokens (both id 0) over a vocabulary of 2:
    #   p_s = 0.5, p_t = 0.25: k1 = log(0.5 / 0.25) = log 2;  r = 0.5, k3 = (0.5 - 1) - log 0.5 = log 2 - 0.5
    #   p_s = 0.2, p_t = 0.4:  k1 = log(0.2 / 0.4) = -log 2;  r = 2,   k3 = (2 - 1) - log 2 = 1 - log 2
    # sums: k1 = 0, k3 = 0.5
    student = torch.tensor([[0.5, 0.5], [0.2, 0.8]], dtype=torch.float64).log()
    teacher = torch.tensor([[0.25, 0.75], [0.4, 0.6]], dtype=torch.float64).log()
    hidden = torch.zeros(2, 2, 2, dtype=torch.float64)
    hidden[:, 0] = student
    teacher_logits = torch.zeros(2, 2, 2, dtype=torch.float64)
    teacher_logits[:, 0] = teacher
    labels = torch.tensor([[-100, 0], [-100, 0]])
    loss = SampledReverseKL(estimator=estimator, alpha=0.5)
    out = loss(hidden, identity_head(2), labels, teacher_logits=teacher_logits, source=TokenSource.STUDENT)
    assert float(out.parts["distill"]) == pytest.approx(expected, abs=1e-12)
    assert float(out.total.detach()) == pytest.approx(0.5 * expected, abs=1e-12)  # the value is alpha * the estimate
    assert int(out.count) == 2 and float(out.parts["ce"]) == 0.0  # no cross-entropy on the student's tokens


def test_declarations_and_refusals() -> None:
    loss = SampledReverseKL()
    assert isinstance(loss, TokenLoss) and loss.needs_teacher and not loss.cross_tokenizer
    assert loss.reads["distill"] == {TokenSource.STUDENT} and not loss.reads["ce"]
    with pytest.raises(ConfigError, match=r"llm\.loss\.estimator"):
        SampledReverseKL(estimator="k2")
    hidden = torch.zeros(1, 2, 3, requires_grad=True)
    labels = torch.tensor([[-100, 1]])
    # a training step on dataset tokens: one line naming llm/loss and llm/method
    with pytest.raises(ConfigError, match=r"llm/loss=reverse_kl_sampled .* llm/method=on_policy"):
        loss(hidden, identity_head(3), labels, teacher_logits=torch.zeros(1, 2, 3), source=TokenSource.GROUND_TRUTH)
    # validation (no gradient) on dataset tokens: the exact reverse KL, and the cross-entropy for val/ppl
    with torch.no_grad():
        out = loss(hidden, identity_head(3), labels, teacher_logits=torch.zeros(1, 2, 3), monitor_kl=True)
    assert float(out.total) == pytest.approx(0.0, abs=1e-7) and float(out.parts["ce"]) == pytest.approx(math.log(3))


def test_kd_llm_distill_on_policy_with_the_sampled_loss_trains(kd_home: Path) -> None:
    run_dir = kd_home / "llm_sampled"
    overrides = ["llm/method=on_policy", "llm/loss=reverse_kl_sampled", "llm/teacher=tiny", "llm/student=tiny"]
    overrides += ["trainer.max_steps=3", "+trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    result = run("kd-llm-distill", *overrides, home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    for key in ("train/loss", "train/loss_distill", "val/loss", "val/ppl", "val/kl_to_teacher"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/loss_distill"] >= 0  # k3 is non-negative
