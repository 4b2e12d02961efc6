"""Tokens carry their source and a loss term reads only the sources it declares: on-policy batches (the
student's own samples) never get cross-entropy, for every shipped LM loss at every alpha."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from kd_lightning.cli.common import CONFIG_DIR
from kd_lightning.llm.bpe import train_bpe_tokenizer
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.distillm2_loss import DistiLLM2Loss
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.protocol import SOURCE_KEY, TokenLoss, TokenSource, batch_source
from kd_lightning.methods.lm import OnPolicy
from kd_lightning.recipes.llm_components import pair_tokenizers

LOSSES = sorted(path.stem for path in (Path(CONFIG_DIR) / "llm" / "loss").glob("*.yaml"))
ALPHAS = [0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def bpe_tokenizer():
    return train_bpe_tokenizer(vocab_size=300, num_prompts={"instructions": 20, "arithmetic": 100})


def on_policy_setup(loss_name: str, bpe_tokenizer) -> tuple[OnPolicy, dict]:
    """An on-policy module with the shipped loss ``loss_name`` (a student of its own tokenizer for the
    cross-tokenizer ones) and one batch of prompts."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        loss = instantiate(compose("llm_distill", overrides=[f"llm/loss={loss_name}"]).llm.loss)
    teacher_tokenizer = char_tokenizer()
    student_tokenizer = bpe_tokenizer if loss.cross_tokenizer else teacher_tokenizer
    teacher = random_llama(vocab_size=128, seed=0)
    student = random_llama(tokenizer=student_tokenizer, hidden_size=32, num_layers=1, seed=1)
    pairing = pair_tokenizers(loss, teacher, student, teacher_tokenizer, student_tokenizer)
    data = LLMDataModule(
        **pairing.data,
        train_prompts={"kind": "arithmetic", "num_prompts": 4, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 2, "seed": 0, "split": "heldout"},
        batch_size=4,
    )
    module = OnPolicy(
        student=student,
        loss=loss,
        teacher=teacher,
        optimizer=functools.partial(torch.optim.SGD, lr=0.1),
        lmbda=1.0,
        generation={"max_new_tokens": 8},
        pad_token_id=student_tokenizer.pad_token_id,
        eos_token_id=student_tokenizer.eos_token_id,
        aligned=data.encoder if loss.cross_tokenizer else None,
    )
    return module, next(iter(data.train_dataloader()))


def totals(module: OnPolicy, loss: TokenLoss, batch: dict, alpha: float) -> tuple[float, float, float]:
    """``(total at alpha, total at alpha = 1, the ce part)`` of ``batch``."""
    loss.alpha = alpha
    out = module.loss_on(batch)
    loss.alpha = 1.0
    return float(out.total), float(module.loss_on(batch).total), float(out.parts["ce"])


@pytest.mark.parametrize("loss_name", LOSSES)
def test_on_policy_batches_never_contribute_cross_entropy(loss_name: str, bpe_tokenizer) -> None:
    module, dataset_batch = on_policy_setup(loss_name, bpe_tokenizer)
    sampled = module.training_batch(dataset_batch, 0)
    assert batch_source(sampled) is TokenSource.STUDENT and (sampled["labels"] != -100).any()
    for alpha in ALPHAS:
        total, distill_only, ce = totals(module, module.loss, sampled, alpha)
        # total = alpha * D exactly: the (1 - alpha) * CE term is absent on the student's own tokens
        assert total == pytest.approx(alpha * distill_only, rel=1e-5, abs=1e-6), alpha
        assert ce == 0.0
    if not any(TokenSource.TEACHER in sources for sources in module.loss.reads.values()):
        return  # a loss of student samples only (reverse_kl_sampled): refused on other tokens, test_llm_sampled.py
    # the same tokens labelled as teacher-written text do get the cross-entropy (the check can fail)
    as_teacher_text = {**sampled, SOURCE_KEY: TokenSource.TEACHER.value}
    total, distill_only, ce = totals(module, module.loss, as_teacher_text, 0.5)
    assert ce > 0 and total == pytest.approx(0.5 * distill_only + 0.5 * ce, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_distillm2_reads_cross_entropy_on_teacher_responses_only(alpha: float) -> None:
    loss = DistiLLM2Loss(alpha=alpha, chunk_size=4)
    assert TokenSource.STUDENT not in loss.reads["ce"] and loss.reads["student_responses"] == {TokenSource.STUDENT}
    student, teacher = random_llama(vocab_size=99, seed=1), random_llama(vocab_size=99, seed=0)
    ids = torch.randint(3, 99, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    hidden = student.get_decoder()(input_ids=ids).last_hidden_state
    with torch.no_grad():
        teacher_hidden = teacher.get_decoder()(input_ids=ids).last_hidden_state
    kwargs = {"teacher_hidden": teacher_hidden, "teacher_head": teacher.get_output_embeddings()}
    head = student.get_output_embeddings()
    on_student = loss(hidden, head, labels, source=TokenSource.STUDENT, **kwargs)
    assert float(on_student.parts["ce"]) == 0.0 and "distill/student_responses" in on_student.parts
    assert float(on_student.total) == pytest.approx(float(on_student.parts["distill"]), rel=1e-5)


def test_every_shipped_loss_declares_what_each_term_reads() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        built = [instantiate(compose("llm_distill", overrides=[f"llm/loss={n}"]).llm.loss) for n in LOSSES]
    for loss in [*built, DistiLLM2Loss()]:
        assert isinstance(loss, TokenLoss)
        assert TokenSource.STUDENT not in loss.reads["ce"]
        assert any(TokenSource.STUDENT in sources for sources in loss.reads.values())
