"""A teacher behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, a hosted API).

- Black-box: :meth:`RemoteTeacher.complete` asks ``/v1/chat/completions`` for completions of prompts
  (``kd-llm-generate llm/teacher=remote``), for sequence-level KD on teacher text (``llm/loss=sft``).
- Grey-box: :meth:`RemoteTeacher.top_k_batch` asks ``/v1/completions`` to score given token ids
  (``prompt`` as token ids, ``echo=true``, ``logprobs=k``, ``max_tokens=1`` and vLLM's
  ``return_tokens_as_token_ids``) and turns the answer into the top-k + tail-mass rows of
  :class:`~kd_lightning.llm.token_loss.SparseTeacher`; ``llm/mode=teacher_cache`` stores them in the
  logit cache once, and training reads the cache (the existing sparse path).

HTTP is the ``openai`` client's: its timeout, and its retries with exponential back-off on connection
errors, 408, 409, 429 and 5xx answers (``max_retries``); a redirect to another host is refused (the training
token ids go to ``base_url`` only). Requests run on at most ``concurrency`` threads. Every answer is checked
against its request (:mod:`kd_lightning.llm.remote_answers`) before it is used or kept under ``cache_dir``
(one JSON file per request, keyed by its body, written atomically), so an interrupted job resumes without
asking again; a damaged cache file is dropped and asked again. A failure is one line
(:class:`RemoteTeacherError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from kd_lightning.engine.caching.store import write_text_atomic
from kd_lightning.engine.errors import ConfigError
from kd_lightning.llm.remote_answers import KEY, RemoteTeacherError, chat_texts, check_answer, prompt_scores
from kd_lightning.llm.tokens import IGNORE_INDEX, SparseTeacher

__all__ = ["KEY", "RemoteTeacher", "RemoteTeacherError"]
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class RemoteTeacher:
    """An OpenAI-compatible server as a teacher (see the module docstring).

    Args:
        base_url: the API root, e.g. ``http://127.0.0.1:8000/v1``.
        model: the served model's name (``--served-model-name`` of vLLM).
        api_key_env: the environment variable holding the API key; ``None``: no key (local servers).
        timeout: seconds per request before the client gives up (then retries).
        max_retries: retries per request, with exponential back-off (the ``openai`` client's).
        concurrency: requests in flight at once.
        cache_dir: where answers are kept (resumable); ``None``: not kept.
    """

    base_url: str
    model: str
    api_key_env: str | None = None
    timeout: float = 60.0
    max_retries: int = 3
    concurrency: int = 4
    cache_dir: str | None = None
    _client: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not str(self.base_url).startswith(("http://", "https://")):
            raise ConfigError(f"{KEY}.base_url={self.base_url!r} must be an http(s) URL, e.g. http://127.0.0.1:8000/v1")
        if not (self.timeout > 0 and self.max_retries >= 0 and self.concurrency >= 1):
            raise ConfigError(
                f"{KEY}: timeout={self.timeout} must be > 0, max_retries={self.max_retries} >= 0 and "
                f"concurrency={self.concurrency} >= 1"
            )
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ConfigError(f"{KEY}.api_key_env={self.api_key_env}: that environment variable is not set")

    @property
    def identity(self) -> str:
        """What names this teacher in caches and generated files: the server and the model."""
        return f"remote:{self.base_url.rstrip('/')}:{self.model}"

    @property
    def client(self) -> Any:
        """The ``openai`` client (made on first use); it refuses redirects to another host."""
        if self._client is None:
            from openai import DefaultHttpxClient, OpenAI

            key = os.environ[self.api_key_env] if self.api_key_env else "no-key"
            self._client = OpenAI(
                base_url=self.base_url,
                api_key=key,
                timeout=self.timeout,
                max_retries=self.max_retries,
                http_client=DefaultHttpxClient(event_hooks={"response": [self._refuse_other_hosts]}),
            )
        return self._client

    def _refuse_other_hosts(self, response: Any) -> None:
        """Before a redirect is followed: refuse one to another scheme, host or port (raised through the
        client, which retries only network errors)."""
        if not response.has_redirect_location:
            return
        here, there = response.url, response.url.join(response.headers["location"])
        if (there.scheme, there.host, there.port) != (here.scheme, here.host, here.port):
            raise RemoteTeacherError(
                f"{KEY}.base_url={self.base_url} redirected a request to {there.scheme}://{there.host}:{there.port}; "
                f"the token ids are sent to {KEY}.base_url only: set {KEY}.base_url to the server's own address"
            )

    # ----------------------------------------------------------------------------------------- requests
    def request(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The server's answer to one request (``endpoint``: ``chat`` or ``completions``), checked against the
        request (:func:`~kd_lightning.llm.remote_answers.check_answer`); from the cache when it was asked before.
        Only a checked answer is cached; a cached one that is not valid JSON or fails the check is dropped (a
        warning) and asked again."""
        body = {"model": self.model, **body}
        cached = None
        if self.cache_dir is not None:
            digest = hashlib.sha256(json.dumps([self.identity, endpoint, body], sort_keys=True).encode()).hexdigest()
            cached = Path(self.cache_dir) / digest[:2] / f"{digest}.json"
            if cached.is_file():
                try:
                    answer = json.loads(cached.read_text())
                    check_answer(endpoint, body, answer, self.base_url)
                    return answer
                except ValueError as error:  # not JSON, not UTF-8, or a RemoteTeacherError
                    log.warning(
                        "dropping the damaged cached answer %s (%s); asking %s again", cached, error, self.base_url
                    )
                    cached.unlink(missing_ok=True)
        answer = self._ask(endpoint, body)
        check_answer(endpoint, body, answer, self.base_url)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, json.dumps(answer))
        return answer

    def _ask(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The server's answer to ``body``, as JSON; a failure (after the client's retries) is one line."""
        import openai

        api = self.client.chat.completions if endpoint == "chat" else self.client.completions
        extra = {key: body[key] for key in ("return_tokens_as_token_ids",) if key in body}
        sent = {key: value for key, value in body.items() if key not in extra}
        try:
            return api.create(**sent, extra_body=extra or None).model_dump()
        except openai.APITimeoutError:
            raise RemoteTeacherError(
                f"{self.base_url} did not answer within {KEY}.timeout={self.timeout} s ({self.max_retries} retries); "
                f"raise {KEY}.timeout or lower {KEY}.concurrency"
            ) from None
        except openai.APIConnectionError as error:
            raise RemoteTeacherError(
                f"cannot reach {KEY}.base_url={self.base_url} ({error}; {self.max_retries} retries): is the server up?"
            ) from None
        except openai.APIStatusError as error:
            raise RemoteTeacherError(
                f"{KEY}.base_url={self.base_url} answered HTTP {error.status_code} to a {endpoint} request for "
                f"{KEY}.model={self.model!r} ({self.max_retries} retries): {' '.join(str(error.message).split())[:300]}"
            ) from None
        except openai.OpenAIError as error:
            raise RemoteTeacherError(
                f"{KEY}.base_url={self.base_url} gave an unusable answer to a {endpoint} request "
                f"({type(error).__name__}: {' '.join(str(error).split())[:300]}): is it an OpenAI-compatible server?"
            ) from None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``fn`` over ``items`` on at most ``concurrency`` threads, results in order."""
        items = list(items)
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, items))

    # ---------------------------------------------------------------------------------------- black-box
    def complete(self, prompts: Sequence[Any], settings: Any) -> list[list[str]]:
        """``settings.num_samples`` chat completions per prompt (a :class:`~kd_lightning.llm.prompts.Prompt`),
        as :func:`~kd_lightning.llm.generation.complete` returns them (greedy: temperature 0)."""

        def one(prompt: Any) -> list[str]:
            messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
            messages.append({"role": "user", "content": prompt.text})
            body = {
                "messages": messages,
                "max_tokens": settings.max_new_tokens,
                "n": settings.num_samples,
                "temperature": settings.temperature if settings.do_sample else 0.0,
                "top_p": settings.top_p if settings.do_sample else 1.0,
                "seed": settings.seed,
            }
            return chat_texts(self.request("chat", body), settings.num_samples, self.base_url)

        return self.map(one, prompts)

    # ----------------------------------------------------------------------------------------- grey-box
    def prompt_top_k(self, token_ids: Sequence[int], top_k: int) -> list[dict[int, float] | None]:
        """Per token of ``token_ids``, the server's top-``top_k`` ``{token id: log-probability}`` of the
        distribution that predicts it (``None`` for the first token, which nothing predicts)."""
        body = {
            "prompt": [int(t) for t in token_ids],
            "echo": True,
            "logprobs": top_k,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_tokens_as_token_ids": True,
        }
        answer = self.request("completions", body)
        return prompt_scores(answer, body["prompt"], top_k, body["max_tokens"], self.base_url)

    def top_k_batch(
        self, batch: Mapping[str, Tensor], top_k: int, temperature: float, vocab_size: int
    ) -> SparseTeacher:
        """The :class:`SparseTeacher` rows of every valid token of ``batch`` (loss order), from the server.

        The tail is :math:`\\log(1 - \\sum_{top-k} p)`. Servers report log-probabilities at temperature 1, so
        ``temperature`` must be 1."""
        if temperature != 1.0:
            raise ConfigError(
                f"a remote teacher reports log-probabilities at temperature 1, not {temperature}: "
                "set llm.loss.divergence.temperature=1"
            )
        mask, ids, labels = (batch[key].cpu() for key in ("attention_mask", "input_ids", "labels"))
        rows = [mask[row].nonzero().squeeze(1) for row in range(ids.shape[0])]
        answers = self.map(lambda row: self.prompt_top_k(ids[row, rows[row]].tolist(), top_k), range(ids.shape[0]))
        out_ids, out_log_probs, out_tail = [], [], []
        for row, (positions, answer) in enumerate(zip(rows, answers, strict=True)):
            where = {int(position): index for index, position in enumerate(positions)}
            for position in range(ids.shape[1] - 1):  # row `position` predicts token position + 1
                if labels[row, position + 1] == IGNORE_INDEX:
                    continue
                entry = answer[where[position + 1]]
                best = sorted(entry.items(), key=lambda item: -item[1])[:top_k]  # >= top_k: checked
                if (largest := max(token for token, _ in best)) >= vocab_size:
                    raise ConfigError(
                        f"{KEY}.base_url={self.base_url} returned token id {largest}, beyond the tokenizer's "
                        f"{vocab_size} tokens: {KEY}.model and llm.teacher.tokenizer must match"
                    )
                out_ids.append([token for token, _ in best])
                out_log_probs.append([value for _, value in best])
                mass = sum(math.exp(value) for _, value in best)
                out_tail.append(math.log(max(1.0 - mass, 1e-12)))
        return SparseTeacher(
            torch.tensor(out_ids, dtype=torch.long).reshape(-1, top_k),
            torch.tensor(out_log_probs, dtype=torch.float32).reshape(-1, top_k),
            torch.tensor(out_tail, dtype=torch.float32),
        )
