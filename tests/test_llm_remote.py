"""A teacher behind an OpenAI-compatible server: a local test server on 127.0.0.1 serves the tiny teacher.

The grey-box top-k path must give the in-process sparse teacher's cache rows and loss; the black-box path
the in-process teacher's completions; retries, timeouts, the concurrency limit, the response cache and
a server without log-probabilities behave as documented. Request loops are bounded (few retries, short
timeouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.data import LLMDataModule
from kd_lightning.llm.divergences import ForwardKL
from kd_lightning.llm.generation import GenerationSettings, complete, generate_file
from kd_lightning.llm.local_server import OpenAIServer
from kd_lightning.llm.logit_cache import LogitCache
from kd_lightning.llm.models import char_tokenizer, random_llama
from kd_lightning.llm.prompts import make_prompts
from kd_lightning.llm.records import read_records
from kd_lightning.llm.remote import RemoteTeacher, RemoteTeacherError
from kd_lightning.llm.token_loss import TokenDistillationLoss
from kd_lightning.llm.tokens import final_hidden_states
from tests.test_cli import run


@pytest.fixture(scope="module")
def teacher():
    return random_llama(vocab_size=99, seed=0)  # a head as wide as the tokenizer, as served models have


@pytest.fixture()
def server(teacher):
    with OpenAIServer(teacher, char_tokenizer()) as served:
        yield served


def remote(server: OpenAIServer, tmp_path: Path | None = None, **kwargs) -> RemoteTeacher:
    options = {"timeout": 10.0, "max_retries": 2, "concurrency": 3, **kwargs}
    return RemoteTeacher(server.base_url, "tiny", cache_dir=str(tmp_path / "answers") if tmp_path else None, **options)


def datamodule() -> LLMDataModule:
    return LLMDataModule(
        char_tokenizer(),
        train_prompts={"kind": "arithmetic", "num_prompts": 6, "seed": 0},
        val_prompts={"kind": "arithmetic", "num_prompts": 3, "seed": 0, "split": "heldout"},
        batch_size=3,
    )


def test_remote_top_k_gives_the_in_process_sparse_teacher_and_its_loss(server, teacher, tmp_path: Path) -> None:
    data = datamodule()
    loaders = [data.train_dataloader(), data.val_dataloader()]
    local = LogitCache.build(teacher, loaders, tmp_path / "local", top_k=8, temperature=1.0, vocab_size=99)
    served = LogitCache.build(remote(server), loaders, tmp_path / "remote", top_k=8, temperature=1.0, vocab_size=99)
    assert served.path != local.path and served.meta["teacher"].startswith("remote:")
    student = random_llama(vocab_size=99, seed=1)
    loss = TokenDistillationLoss(ForwardKL(), alpha=0.5, vocab_size=99)
    for batch in data.val_dataloader():
        ours, theirs = local.lookup(batch), served.lookup(batch)
        assert torch.equal(ours.ids, theirs.ids)
        torch.testing.assert_close(ours.log_probs, theirs.log_probs, atol=2e-3, rtol=0)  # float16 on disk
        torch.testing.assert_close(ours.tail, theirs.tail, atol=1e-4, rtol=1e-4)
        hidden = final_hidden_states(student, batch["input_ids"], batch["attention_mask"])
        expected = loss(hidden, student.lm_head, batch["labels"], teacher_topk=ours)
        got = loss(hidden, student.lm_head, batch["labels"], teacher_topk=theirs)
        assert got.total.item() == pytest.approx(expected.total.item(), rel=1e-4)
    with pytest.raises(ConfigError, match="temperature 1"):
        remote(server).top_k_batch(next(iter(data.val_dataloader())), 4, 2.0, 99)


def test_remote_completions_match_the_in_process_teacher_and_are_cached(server, teacher, tmp_path: Path) -> None:
    prompts = make_prompts("arithmetic", 4, 0)
    settings = GenerationSettings(max_new_tokens=8)
    served = remote(server, tmp_path)
    out = tmp_path / "remote.jsonl"
    generate_file(served, char_tokenizer(), prompts, out, settings, batch_size=2, progress=False)
    assert [r["completion"] for r in read_records(out)] == [
        c[0] for c in complete(teacher, char_tokenizer(), prompts, settings)
    ]
    assert server.requests == 4
    out.unlink()
    generate_file(remote(server, tmp_path), char_tokenizer(), prompts, out, settings, progress=False)
    assert server.requests == 4  # every answer came from the cache under cache_dir
    assert json.loads(out.with_name(out.name + ".meta.json").read_text())["model"] == served.identity


def test_retries_back_off_then_succeed_and_timeouts_are_bounded(server) -> None:
    server.fail_first = 2  # 503 twice: the client retries with back-off
    assert remote(server, max_retries=2).prompt_top_k([5, 6, 7], 4)[1] is not None
    assert server.requests == 3
    server.fail_first, server.requests = 100, 0
    with pytest.raises(RemoteTeacherError, match="HTTP 503"):
        remote(server, max_retries=1).prompt_top_k([5, 6, 7], 4)
    assert server.requests == 2  # one try + one retry, then the error
    server.fail_first, server.delay, server.requests = 0, 1.0, 0
    with pytest.raises(RemoteTeacherError, match=r"timeout=0\.2"):
        remote(server, timeout=0.2, max_retries=1).prompt_top_k([5, 6, 7], 4)
    assert server.requests == 2
    with pytest.raises(RemoteTeacherError, match="cannot reach"):
        RemoteTeacher("http://127.0.0.1:9/v1", "tiny", timeout=1.0, max_retries=0).prompt_top_k([1, 2], 2)


def test_requests_in_flight_stay_under_the_concurrency_limit(server) -> None:
    server.delay = 0.05
    data = datamodule()
    batch = next(iter(data.train_dataloader()))
    remote(server, concurrency=2).top_k_batch(
        {k: v.repeat(3, 1) for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}, 4, 1.0, 99
    )
    assert server.requests == 9 and server.max_in_flight == 2


def test_a_server_without_logprobs_is_a_clear_error(server) -> None:
    server.logprobs = False
    with pytest.raises(ConfigError, match="black-box"):
        remote(server).prompt_top_k([5, 6, 7], 4)


def test_kd_llm_distill_with_a_remote_teacher(server, kd_home: Path) -> None:
    common = [
        "llm/teacher=remote",
        f"llm.teacher.model.base_url={server.base_url}",
        "llm.teacher.model.model=tiny",
        "llm.teacher.tokenizer._target_=kd_lightning.llm.models.char_tokenizer",
        "llm/student=tiny",
        "llm.student.vocab_size=99",
        "trainer.max_steps=2",
        "+trainer.enable_progress_bar=false",
        "llm.data.train_prompts.num_prompts=8",
        "llm.data.val_prompts.num_prompts=4",
    ]
    run_dir = kd_home / "llm_cli" / "remote"
    result = run(
        "kd-llm-distill",
        *common,
        "llm/teacher_cache=top_k",
        "llm.teacher_cache.top_k=8",
        f"hydra.run.dir={run_dir}",
        home=kd_home,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["val/kl_to_teacher"] > 0 and summary["details"]["logit_cache"]
    assert server.requests == 12  # every training and validation example scored once
    # Without llm/teacher_cache the server scores every step (tests/test_llm_served.py); a scheme that runs its
    # teachers in process is still refused, pointing to the cache.
    bad = [*common, "llm/method=distillm2", f"hydra.run.dir={kd_home / 'llm_cli' / 'remote_bad'}"]
    result = run("kd-llm-distill", *bad, home=kd_home)
    assert result.returncode == 2 and "llm/teacher_cache=top_k" in result.stderr
