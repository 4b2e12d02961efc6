"""Every answer of an OpenAI-compatible server is checked against its request before it is used or cached.

A scripted fake server on 127.0.0.1 (stdlib HTTP, an ephemeral port) answers like vLLM (``echo`` +
``logprobs`` with ``return_tokens_as_token_ids``, ``n`` chat choices) and then misbehaves one way at a time:
a prepended entry, other echoed tokens, log-probabilities above 0, NaN or all ``-inf``, null chat content,
too few choices, a redirect to another host, HTTP 500, a timeout, a damaged response cache."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from kd_lightning.cli.common import exit_on_config_error
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.generation import GenerationSettings
from kd_lightning.llm.local_server import JSONServer
from kd_lightning.llm.prompts import Prompt
from kd_lightning.llm.remote import RemoteTeacher, RemoteTeacherError

#: The fake teacher's distribution at every position: the next token, then the three ids after it.
PROBS = [0.5, 0.25, 0.125, 0.0625]
VOCAB = 50
BASE = "llm.teacher.model.base_url="


class FakeServer(JSONServer):
    """A vLLM-like server whose answers ``mutate`` (``(body, answer) -> answer``) may spoil; ``status``
    answers every request with that HTTP status, ``delay`` waits first, ``redirect`` (``scheme://host:port``)
    answers 307 to ``/moved/...`` there."""

    def __init__(self) -> None:
        super().__init__()
        self.mutate: Callable[[dict, dict], dict] | None = None
        self.status, self.delay, self.redirect = 200, 0.0, None
        self.requests: list[dict] = []

    def respond(self, path: str, body: dict) -> tuple[int, dict | None, dict[str, str]]:
        self.requests.append(body)
        time.sleep(self.delay)
        if self.redirect and not path.startswith("/moved"):
            return 307, None, {"Location": f"{self.redirect}/moved{path}"}
        answer = self.chat(body) if path.endswith("/chat/completions") else self.score(body)
        if self.mutate is not None:
            answer = self.mutate(body, answer)
        if self.status != 200:
            answer = {"error": {"message": "internal\nerror", "type": "server_error"}}
        return self.status, answer, {}  # NaN and -Infinity as Python's json writes them

    @staticmethod
    def chat(body: dict) -> dict:
        text = body["messages"][-1]["content"]
        choices = [
            {"index": i, "message": {"role": "assistant", "content": f" {text} #{i} "}, "finish_reason": "stop"}
            for i in reversed(range(body.get("n", 1)))  # out of order: the client sorts by index
        ]
        return {"id": "chat-1", "object": "chat.completion", "created": 0, "model": body["model"], "choices": choices}

    @staticmethod
    def score(body: dict) -> dict:
        tokens = [*body["prompt"], 1]  # the prompt echoed, then one generated token
        tops: list[dict | None] = [None]
        for token in tokens[1:]:
            tops.append({f"token_id:{(token + d) % VOCAB}": math.log(p) for d, p in enumerate(PROBS)})
        logprobs = {
            "tokens": [f"token_id:{t}" for t in tokens],
            "token_logprobs": [None, *(math.log(PROBS[0]) for _ in tokens[1:])],
            "top_logprobs": tops,
            "text_offset": list(range(len(tokens))),
        }
        choice = {"index": 0, "text": "", "finish_reason": "length", "logprobs": logprobs}
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}


@pytest.fixture()
def server():
    fake = FakeServer()
    fake.thread.start()
    yield fake
    fake.httpd.shutdown()
    fake.httpd.server_close()


def remote(server: FakeServer, tmp_path: Path | None = None, **kwargs: Any) -> RemoteTeacher:
    options = {"timeout": 5.0, "max_retries": 0, "concurrency": 2, **kwargs}
    return RemoteTeacher(server.base_url, "fake", cache_dir=str(tmp_path / "answers") if tmp_path else None, **options)


def cached_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "answers").rglob("*.json"))


def batch() -> dict[str, torch.Tensor]:
    """Two rows: [3, 4, 5, 6] and, left-padded, [9, 10, 11]; loss on the last two tokens of each."""
    return {
        "input_ids": torch.tensor([[3, 4, 5, 6], [0, 9, 10, 11]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 5, 6], [-100, -100, 10, 11]]),
    }


def test_a_healthy_server_gives_the_exact_sparse_teacher_and_completions(server, tmp_path: Path) -> None:
    served = remote(server, tmp_path)
    top = served.top_k_batch(batch(), 3, 1.0, VOCAB)
    assert torch.equal(top.ids, torch.tensor([[5, 6, 7], [6, 7, 8], [10, 11, 12], [11, 12, 13]]))
    assert torch.equal(top.log_probs, torch.tensor([[math.log(p) for p in PROBS[:3]]] * 4, dtype=torch.float32))
    tail = math.log(1 - sum(math.exp(math.log(p)) for p in PROBS[:3]))  # as the client sums them
    assert torch.equal(top.tail, torch.full((4,), tail, dtype=torch.float32))
    assert [body["prompt"] for body in server.requests] in ([[3, 4, 5, 6], [9, 10, 11]], [[9, 10, 11], [3, 4, 5, 6]])
    settings = GenerationSettings(max_new_tokens=4, do_sample=True, num_samples=2)
    assert served.complete([Prompt("a", "hi", "instructions", None)], settings) == [["hi #0", "hi #1"]]
    assert len(cached_files(tmp_path)) == 3
    assert served.prompt_top_k([7], 4) == [None]  # one token: nothing predicts it
    again = remote(server, tmp_path)
    assert again.top_k_batch(batch(), 3, 1.0, VOCAB).ids.tolist() == top.ids.tolist()
    assert len(server.requests) == 4  # all from the cache


def prepend(entry: Any, tokens: bool = False, generated: bool = True) -> Callable[[dict, dict], dict]:
    """A server that adds a BOS token: one more entry first (and, with ``tokens``, a BOS echoed first)."""

    def mutate(body: dict, answer: dict) -> dict:
        logprobs = answer["choices"][0]["logprobs"]
        logprobs["top_logprobs"].insert(0, entry)
        logprobs["token_logprobs"].insert(0, None)
        if tokens:
            logprobs["tokens"].insert(0, "token_id:0")
        else:
            del logprobs["tokens"]
        if not generated:
            for name in ("top_logprobs", "token_logprobs", "tokens"):
                logprobs.get(name, [None]).pop()
        return answer

    return mutate


def entry_value(position: int, value: float, everywhere: bool = False) -> Callable[[dict, dict], dict]:
    """Set the first log-probability of the entry at ``position`` (every one of its values with ``everywhere``)."""

    def mutate(body: dict, answer: dict) -> dict:
        entry = answer["choices"][0]["logprobs"]["top_logprobs"][position]
        for key in list(entry)[: len(entry) if everywhere else 1]:
            entry[key] = value
        return answer

    return mutate


def logprobs_edit(fn: Callable[[dict], None]) -> Callable[[dict, dict], dict]:
    def mutate(body: dict, answer: dict) -> dict:
        fn(answer["choices"][0]["logprobs"])
        return answer

    return mutate


BAD_SCORES = {
    "prepended entry, no echoed tokens": (prepend(None), r"5 log-probability entries for 3 prompt tokens .*BOS"),
    "prepended BOS echoed": (prepend({"token_id:3": -0.1}, tokens=True), r"5 log-probability entries for 3"),
    "prepended BOS, nothing generated": (
        prepend(None, tokens=True, generated=False),
        r"echoed the tokens \[0, 9, 10, 11\]\.\.\. .*not the 3 sent \[9, 10, 11\].*no added BOS",
    ),
    "other echoed tokens": (
        logprobs_edit(lambda lp: lp["tokens"].__setitem__(1, "token_id:42")),
        r"echoed the tokens \[9, 42, 11, 1\].*not the 3 sent",
    ),
    "text tokens": (logprobs_edit(lambda lp: lp["tokens"].__setitem__(1, "ten")), r"names tokens by text .*'ten'"),
    "truncated": (
        logprobs_edit(lambda lp: lp["top_logprobs"].pop() and lp["top_logprobs"].pop()),
        r"2 log-probability entries for 3 prompt tokens",
    ),
    "log-prob above 0": (entry_value(1, 0.01), r"log-probability 0\.01 at token position 1 .*<= 0"),
    "NaN": (entry_value(2, math.nan), r"log-probability nan at token position 2 .*float16"),
    "NaN token log-prob": (
        logprobs_edit(lambda lp: lp["token_logprobs"].__setitem__(2, math.nan)),
        r"nan at token_logprobs\[2\]",
    ),
    "all -inf": (entry_value(1, -math.inf, everywhere=True), r"only -inf log-probabilities at token position 1"),
    "not normalized": (entry_value(1, -0.1, everywhere=True), r"summing to 3\.6193 > 1 at token position 1"),
    "too few per token": (
        logprobs_edit(lambda lp: lp["top_logprobs"][1].pop("token_id:10")),
        r"3 log-probabilities per token, fewer than llm\.teacher_cache\.top_k=4",
    ),
    "no log-probs": (lambda body, answer: {**answer, "choices": [{"index": 0, "text": ""}]}, r"black-box"),
    "no choices": (lambda body, answer: {"id": "x"}, r"without a list of choices"),
}


@pytest.mark.parametrize("name", list(BAD_SCORES))
def test_a_scoring_answer_that_does_not_fit_its_request_is_refused_and_never_cached(
    server, tmp_path: Path, name: str
) -> None:
    server.mutate, message = BAD_SCORES[name]
    with pytest.raises(RemoteTeacherError, match=message) as error:
        remote(server, tmp_path).prompt_top_k([9, 10, 11], 4)
    assert "\n" not in str(error.value) and str(error.value).startswith(f"{BASE}{server.base_url} ")
    assert cached_files(tmp_path) == []
    server.mutate = None  # the same request against a healthy server: asked again, and used
    assert remote(server, tmp_path).prompt_top_k([9, 10, 11], 4)[2] == {
        11 + d: math.log(p) for d, p in enumerate(PROBS)
    }
    assert len(server.requests) == 2 and len(cached_files(tmp_path)) == 1


def test_a_log_prob_within_rounding_of_zero_reads_zero(server) -> None:
    certain = {"token_id:10": 5e-5, **{f"token_id:{t}": -math.inf for t in (11, 12, 13)}}
    server.mutate = logprobs_edit(lambda lp: lp["top_logprobs"].__setitem__(1, certain))
    assert remote(server).prompt_top_k([9, 10, 11], 4)[1] == {10: 0.0, 11: -math.inf, 12: -math.inf, 13: -math.inf}
    server.mutate = entry_value(1, -math.inf)  # one impossible token among the top entries is fine
    assert remote(server).prompt_top_k([9, 10, 11], 4)[1][10] == -math.inf


def test_a_token_beyond_the_tokenizer_is_refused(server) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"{BASE}.* returned token id 12, beyond the tokenizer's 12 tokens: llm\.teacher\.model\.model",
    ):
        remote(server).top_k_batch(batch(), 3, 1.0, 12)


def test_chat_answers_without_text_or_with_too_few_choices_are_refused(server, tmp_path: Path) -> None:
    prompts, settings = [Prompt("a", "hi", "instructions", None)], GenerationSettings(max_new_tokens=4)
    server.mutate = lambda body, answer: {**answer, "choices": [{"index": 0, "message": {"content": None}}]}
    with pytest.raises(RemoteTeacherError, match=rf"{BASE}.*message\.content=None.*llm\.teacher\.model\.model"):
        remote(server, tmp_path).complete(prompts, settings)
    sampled = GenerationSettings(max_new_tokens=4, do_sample=True, num_samples=3)
    server.mutate = lambda body, answer: {**answer, "choices": answer["choices"][:2]}
    with pytest.raises(RemoteTeacherError, match=rf"{BASE}.* 2 chat completions for n=3 \(generate\.num_samples\)"):
        remote(server, tmp_path).complete(prompts, sampled)
    server.mutate = lambda body, answer: {**answer, "choices": [{**c, "index": 0} for c in answer["choices"]]}
    with pytest.raises(RemoteTeacherError, match=r"indices \[0, 0, 0\] for n=3"):
        remote(server, tmp_path).complete(prompts, sampled)
    assert cached_files(tmp_path) == []
    server.mutate = None
    assert remote(server, tmp_path).complete(prompts, sampled) == [["hi #0", "hi #1", "hi #2"]]


def test_a_redirect_to_another_host_is_refused_before_anything_is_sent_there(server) -> None:
    other = FakeServer()
    other.thread.start()
    try:
        server.redirect = other.base_url.removesuffix("/v1").replace("127.0.0.1", "localhost")
        with pytest.raises(RemoteTeacherError, match=rf"{BASE}.* redirected a request to http://localhost:\d+; "):
            remote(server, max_retries=2).prompt_top_k([9, 10, 11], 4)
        assert len(server.requests) == 1 and other.requests == []  # not retried, never sent there
        server.redirect = server.base_url.removesuffix("/v1")  # the same host: followed
        assert remote(server).prompt_top_k([9, 10, 11], 4)[1] is not None and len(server.requests) == 3
    finally:
        other.httpd.shutdown()
        other.httpd.server_close()


def test_server_failures_are_one_line_errors(server, tmp_path: Path, capsys) -> None:
    server.status = 500
    with pytest.raises(RemoteTeacherError, match=rf"{BASE}.* answered HTTP 500 .*fake'.*internal error") as error:
        remote(server, tmp_path).prompt_top_k([9, 10, 11], 4)
    assert "\n" not in str(error.value) and isinstance(error.value, ConfigError) and cached_files(tmp_path) == []
    server.status, server.delay = 200, 0.5
    with pytest.raises(RemoteTeacherError, match=r"within llm\.teacher\.model\.timeout=0\.2 s .*raise llm\.teacher"):
        remote(server, timeout=0.2).prompt_top_k([9, 10, 11], 4)
    server.delay, server.status = 0.0, 500
    job = lambda cfg: remote(server).prompt_top_k([9, 10, 11], 4)  # noqa: E731
    with pytest.raises(SystemExit) as stop:
        exit_on_config_error(job, OmegaConf.create({}), "kd-llm-distill")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and err.startswith("kd-llm-distill: error: ")
    assert "Traceback" not in err


def test_a_damaged_cached_answer_is_dropped_and_asked_again(server, tmp_path: Path, caplog) -> None:
    expected = remote(server, tmp_path).prompt_top_k([9, 10, 11], 4)
    (path,) = cached_files(tmp_path)
    good = path.read_text()
    for damage in (good[: len(good) // 2], good.replace("-0.69314718", "NaN", 1), "\xff"):
        path.write_text(damage, encoding="latin-1")
        with caplog.at_level(logging.WARNING, logger="kd_lightning.llm.remote"):
            assert remote(server, tmp_path).prompt_top_k([9, 10, 11], 4) == expected
        assert "dropping the damaged cached answer" in caplog.text and path.read_text() == good
        caplog.clear()
    assert len(server.requests) == 4  # once, then once per damaged file


def test_a_nan_answer_is_never_cached_so_a_healthy_server_later_succeeds(server, tmp_path: Path) -> None:
    server.mutate = entry_value(2, math.nan)
    for _ in range(3):
        with pytest.raises(RemoteTeacherError, match="nan"):
            remote(server, tmp_path).top_k_batch(batch(), 3, 1.0, VOCAB)
    assert cached_files(tmp_path) == []
    server.mutate = None
    top = remote(server, tmp_path).top_k_batch(batch(), 3, 1.0, VOCAB)
    assert top.ids[:, 0].tolist() == [5, 6, 10, 11] and len(cached_files(tmp_path)) == 2
