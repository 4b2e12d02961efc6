"""A teacher behind a server scoring every training step (``llm/teacher=remote`` without a cache).

The served rows must be the in-process teacher's top-k rows (so the loss is the cached / in-process sparse
loss), for dataset batches and for the student's own samples (on-policy); batches are sent to the server as
the loader reads them, ``prefetch`` batches ahead, and a read-ahead batch is never asked twice; the schemes
and losses that cannot read a served teacher are refused in one line before any step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL, GeneralizedJSD
from kd_lightning.llm.local_server import OpenAIServer
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.protocol import TokenSource
from kd_lightning.llm.remote import RemoteTeacher
from kd_lightning.llm.served import ReadAheadLoader, ServedTeacher
from kd_lightning.llm.teacher_rows import teacher_top_k
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import SparseTeacher, final_hidden_states
from kd_lightning.methods.lm import OnPolicy, TokenKD
from tests.test_cli import run

VOCAB = 99


@pytest.fixture(scope="module")
def teacher():
    return random_llama(vocab_size=VOCAB, seed=0)


@pytest.fixture()
def server(teacher):
    with OpenAIServer(teacher, char_tokenizer()) as served:
        yield served


def served_teacher(server: OpenAIServer, top_k: int = 8, **kwargs: Any) -> ServedTeacher:
    remote = RemoteTeacher(server.base_url, "tiny", timeout=10.0, max_retries=1, concurrency=2)
    return ServedTeacher(remote, top_k, 1.0, VOCAB, **kwargs)


def datamodule(**kwargs: Any) -> LLMDataModule:
    return LLMDataModule(
        char_tokenizer(),
        train_prompts={"kind": "arithmetic", "num_prompts": 8, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 3, "seed": 0, "split": "heldout"},
        batch_size=2,
        **kwargs,
    )


def assert_same_rows(got: SparseTeacher, want: SparseTeacher) -> None:
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.log_probs, want.log_probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.tail, want.tail, atol=1e-4, rtol=0)


def test_served_rows_are_the_in_process_teachers_top_k(server, teacher) -> None:
    served = served_teacher(server)
    batch = next(iter(datamodule().train_dataloader()))
    assert_same_rows(served.lookup(batch), teacher_top_k(teacher, batch, 8, 1.0, VOCAB))
    assert served.requests == 2 and not served.pending  # one request per example; nothing left behind
    served.close()


def test_loader_sends_batches_ahead_and_lookups_reuse_them(server, teacher) -> None:
    served = served_teacher(server)
    data = datamodule()
    data.read_ahead_with(served.submit, depth=2)
    loader = data.train_dataloader()
    assert isinstance(loader, ReadAheadLoader)
    batches = iter(loader)
    first = next(batches)
    assert served.requests == 3 * 2  # the batch yielded and the two behind it are being scored
    assert_same_rows(served.lookup(first), teacher_top_k(teacher, first, 8, 1.0, VOCAB))
    assert served.requests == 6  # answered from what was read ahead: no request of its own
    rest = list(batches)
    assert len(rest) == 3 and served.requests == 8  # every example asked once
    for batch in rest:
        served.lookup(batch)
    assert server.requests == 8 and not served.pending
    served.close()


def test_token_kd_step_with_a_served_teacher_is_the_sparse_loss(server, teacher) -> None:
    student = random_llama(vocab_size=VOCAB, seed=1)
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5)
    module = TokenKD(student, loss, torch.optim.AdamW, served_teacher=served_teacher(server))
    batch = next(iter(datamodule().train_dataloader()))
    got = module.loss_on(batch)
    sparse = teacher_top_k(teacher, batch, 8, 1.0, VOCAB)
    hidden = final_hidden_states(student, batch["input_ids"], batch["attention_mask"])
    expected = loss(hidden, student.get_output_embeddings(), batch["labels"], teacher_topk=sparse)
    torch.testing.assert_close(got.total, expected.total, atol=1e-5, rtol=1e-5)
    assert module.teacher_identities()["served"].startswith("remote:")


def test_on_policy_samples_are_scored_by_the_server(server, teacher) -> None:
    student = random_llama(vocab_size=VOCAB, seed=1)
    loss = TokenDistillationLoss(GeneralizedJSD(), alpha=1.0)
    module = OnPolicy(
        student,
        loss,
        torch.optim.AdamW,
        served_teacher=served_teacher(server),
        lmbda=1.0,
        generation={"max_new_tokens": 6},
        pad_token_id=0,
        eos_token_id=2,
    )
    prompts = next(iter(datamodule(prompt_only=True).train_dataloader()))
    sampled = module.training_batch(prompts, 0)
    got = module.loss_on(sampled)
    hidden = final_hidden_states(student, sampled["input_ids"], sampled["attention_mask"])
    sparse = teacher_top_k(teacher, sampled, 8, 1.0, VOCAB)
    expected = loss(
        hidden, student.get_output_embeddings(), sampled["labels"], teacher_topk=sparse, source=TokenSource.STUDENT
    )
    torch.testing.assert_close(got.total, expected.total, atol=1e-5, rtol=1e-5)
    assert server.requests == 2  # the two samples, asked in the step


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"temperature": 2.0}, "llm.loss.divergence.temperature=2.0"),
        ({"prefetch": -1}, "llm.teacher.prefetch=-1"),
        ({"top_k": VOCAB}, "llm.teacher.top_k=99"),
        ({"top_k": 2.5}, "llm.teacher.top_k=2.5"),
    ],
)
def test_served_teacher_settings_are_checked(kwargs: dict[str, Any], needle: str) -> None:
    remote = RemoteTeacher("http://127.0.0.1:9/v1", "tiny")
    options = {"top_k": 8, "temperature": 1.0, "vocab_size": VOCAB, **kwargs}
    with pytest.raises(ConfigError, match="^" + needle.replace(".", r"\.").replace("[", r"\[")):
        ServedTeacher(remote, **options)


def kd_llm_distill(server: OpenAIServer, home: Path, name: str, *extra: str):
    run_dir = home / "llm_cli" / name
    result = run(
        "kd-llm-distill",
        "llm/teacher=remote",
        f"llm.teacher.model.base_url={server.base_url}",
        "llm.teacher.model.model=tiny",
        "llm.teacher.tokenizer._target_=kd_lightning.llm.models.char_tokenizer",
        "llm.teacher.top_k=8",
        "llm/student=tiny",
        f"llm.student.vocab_size={VOCAB}",
        "trainer.max_steps=3",
        "+trainer.enable_progress_bar=false",
        "llm.data.train_prompts.num_prompts=8",
        "llm.data.val_prompts.num_prompts=4",
        f"hydra.run.dir={run_dir}",
        *extra,
        home=home,
    )
    return result, run_dir


def test_kd_llm_distill_trains_with_a_served_teacher(server, kd_home: Path) -> None:
    result, run_dir = kd_llm_distill(server, kd_home, "served")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val/kl_to_teacher"] > 0 and summary["details"]["logit_cache"] is None
    # 3 steps = 3 epochs of one batch of 8; each distinct example asked once (later epochs: the response cache)
    assert server.requests == 8 + 4


def test_a_packed_run_with_a_served_teacher_trains_as_the_padded_one(server, kd_home: Path) -> None:
    padded, padded_dir = kd_llm_distill(server, kd_home, "served_padded")
    packed, packed_dir = kd_llm_distill(
        server, kd_home, "served_packed", "llm.data.packing=true", "llm.data.pack_length=480"
    )
    assert padded.returncode == 0 and packed.returncode == 0, packed.stderr[-3000:]
    metrics = [json.loads((d / "summary.json").read_text())["metrics"] for d in (padded_dir, packed_dir)]
    for name in ("train/loss", "val/loss", "val/kl_to_teacher"):
        assert metrics[1][name] == pytest.approx(metrics[0][name], rel=1e-5), name


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["llm/method=distillm2"], "llm/method=distillm2 runs its teachers in process"),
        (["llm/loss=jsd", "llm.loss.divergence.temperature=2.0"], "llm.loss.divergence.temperature=2.0"),
    ],
)
def test_kd_llm_distill_refuses_what_a_served_teacher_cannot_score(server, kd_home: Path, extra, needle) -> None:
    result, _ = kd_llm_distill(server, kd_home, "served_bad", *extra)
    assert result.returncode == 2 and needle in result.stderr, result.stderr[-2000:]
    assert server.requests == 0
