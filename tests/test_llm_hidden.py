"""Hidden-state distillation for causal LMs (llm/hidden): the library's term against a plain formula over
Hugging Face's ``output_hidden_states``, the projection in the optimizer and the checkpoint, the refusals,
and one kd-llm-distill run."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.hidden import HiddenStateLoss, uniform_map
from kd_lightning.llm.models import random_llama
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.methods.lm import SFT, TokenKD
from tests.test_cli import run

VOCAB = 128


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A student of 2 layers, width 16, and a teacher of 4 layers, width 32 (so a projection is learned)."""
    student = random_llama(vocab_size=VOCAB, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32, seed=1)
    teacher = random_llama(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=4, intermediate_size=64, seed=0)
    return student.double(), teacher.double().eval().requires_grad_(False)


def module(hidden: HiddenStateLoss, **kwargs) -> TokenKD:
    student, teacher = models()
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, vocab_size=VOCAB)
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-2)
    return TokenKD(student=student, loss=loss, optimizer=optimizer, teacher=teacher, hidden=hidden, **kwargs)


def batch() -> dict[str, torch.Tensor]:
    """Right-padded rows (the padding is left out of the term); the completion is labelled."""
    torch.manual_seed(3)
    ids = torch.randint(3, VOCAB, (3, 7))
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_term(student, teacher, rows, weights: dict[int, torch.Tensor], pairs: dict[int, int], distance: str):
    """mean over pairs of (1/|P|) sum over non-padded tokens of d(W h_s, h_t), from output_hidden_states."""
    mask = rows["attention_mask"].bool()
    hs = student(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], output_hidden_states=True)
    with torch.no_grad():
        ht = teacher(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"], output_hidden_states=True)
    terms = []
    for s, t in pairs.items():
        a = hs.hidden_states[s][mask] @ weights[s].T
        b = ht.hidden_states[t][mask]
        d = ((a - b) ** 2).mean(-1) if distance == "mse" else 1 - F.cosine_similarity(a, b, dim=-1)
        terms.append(d.sum() / mask.sum())
    return torch.stack(terms).mean()


@pytest.mark.parametrize("distance", ["mse", "cosine"])
def test_term_and_projection_gradient_match_the_plain_formula(distance: str) -> None:
    pairs = {1: 3, 2: 4}  # 2 is the student's last layer: Hugging Face's last hidden state is after the norm
    method = module(HiddenStateLoss(layers=pairs, distance=distance, weight=0.5)).double().train()
    rows = batch()
    out = method.one_loss(method.loss, rows, monitor_kl=False)
    out.total.backward()
    weights = {s: method.hidden.projections[str(s)].weight.detach().clone().requires_grad_(True) for s in pairs}
    expected = plain_term(method.student, method.teacher, rows, weights, pairs, distance)
    torch.testing.assert_close(out.parts["hidden"] / out.count, expected.detach(), rtol=0, atol=1e-6)
    # the token loss does not read the projections: their gradient is the hidden term's alone
    (0.5 * expected * out.count).backward()
    for s in pairs:
        grad = method.hidden.projections[str(s)].weight.grad
        torch.testing.assert_close(grad, weights[s].grad, rtol=0, atol=1e-6)
    assert out.count == (rows["labels"][:, 1:] != -100).sum()


def test_projection_is_trained_and_saved_and_the_term_is_off_in_validation() -> None:
    method = module(HiddenStateLoss(layers="uniform"))
    assert [pair for pair in method.hidden.pairs] == [(1, 2), (2, 4)] == sorted(uniform_map(2, 4).items())
    projections = {id(p) for p in method.hidden.parameters()}
    assert len(projections) == 2 and projections <= {id(p) for p in method.trainable_parameters()}
    assert not projections & {id(p) for p in method.teacher.parameters()}
    state = method.state_dict()
    assert state["hidden.projections.1.weight"].shape == (32, 16) and "hidden.projections.2.weight" in state
    method.eval()
    assert "hidden" not in method.one_loss(method.loss, batch(), monitor_kl=True).parts


def test_same_width_means_no_projection() -> None:
    _, teacher = models()
    hidden = HiddenStateLoss(layers={1: 1})
    hidden.bind(teacher, teacher)
    assert not list(hidden.parameters())


def test_refusals_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"llm.hidden.layers: 3: 4 is out of range: student layers are 1..2"):
        module(HiddenStateLoss(layers={3: 4}))
    with pytest.raises(ConfigError, match=r"llm.hidden.layers: 1: 5 is out of range.*teacher layers 1..4"):
        module(HiddenStateLoss(layers={1: 5}))
    with pytest.raises(ConfigError, match=r"llm\.hidden\.distance='l1'"):
        HiddenStateLoss(distance="l1")
    with pytest.raises(ConfigError, match=r"llm\.hidden\.weight=0"):
        HiddenStateLoss(weight=0)
    with pytest.raises(ConfigError, match="llm/teacher_cache=none"):
        TokenKD.check_hidden(cached=True, remote=False, cross_tokenizer=False)
    with pytest.raises(ConfigError, match="llm/method=sft"):
        SFT.check_hidden(cached=False, remote=False, cross_tokenizer=False)


def test_kd_llm_distill_refuses_a_cached_teacher_in_one_line(kd_home: Path) -> None:
    args = ["llm/teacher=tiny", "llm/student=tiny", "llm/hidden=mse", "llm/teacher_cache=top_k"]
    result = run("kd-llm-distill", *args, f"hydra.run.dir={kd_home / 'hidden_cached'}", home=kd_home)
    assert result.returncode != 0
    assert "llm/hidden reads the teacher's decoder layers, which llm/teacher_cache does not keep" in result.stderr


@pytest.mark.parametrize(
    "scheme", [["llm/hidden=mse"], ["llm/hidden=cosine", "llm/method=on_policy", "llm/loss=jsd"]], ids=["mse", "gkd"]
)
def test_kd_llm_distill_trains_with_the_hidden_term(scheme: list[str], kd_home: Path) -> None:
    run_dir = kd_home / "llm_hidden" / scheme[0].split("=")[1]
    args = ["llm/teacher=tiny", "llm/student=tiny", *scheme, "llm.student.hidden_size=16"]
    result = run("kd-llm-distill", *args, "trainer.max_steps=3", f"hydra.run.dir={run_dir}", home=kd_home)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "summary.json").read_text())["metrics"]
    assert metrics["train/loss_hidden"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"]["hidden.projections.2.weight"].shape == (32, 16)
