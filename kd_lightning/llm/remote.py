"""A teacher behind an OpenAI-compatible server (vLLM, SGLang, llama.cpp's server, a hosted API).

- Black-box: :meth:`RemoteTeacher.complete` asks ``/v1/chat/completions`` for completions of prompts
  (``kd-llm-generate llm/teacher=remote``), for sequence-level KD on teacher text (``llm/loss=sft``).
- Grey-box: :meth:`RemoteTeacher.top_k_batch` asks ``/v1/completions`` to score given token ids
  (``prompt`` as token ids, ``echo=true``, ``logprobs=k``, ``max_tokens=1`` and vLLM's
  ``return_tokens_as_token_ids``) and turns the answer into the top-k + tail-mass rows of
  :class:`~kd_lightning.llm.token_loss.SparseTeacher`; ``llm/mode=teacher_cache`` stores them in the
  logit cache once, and training reads the cache (the existing sparse path).

HTTP is the ``openai`` client's: its timeout, and its retries with exponential back-off on connection
errors, 408, 409, 429 and 5xx answers (``max_retries``). Requests run on at most ``concurrency`` threads.
Every answer is kept under ``cache_dir`` (one JSON file per request, keyed by its body, written
atomically), so an interrupted job resumes without asking again.
"""

from __future__ import annotations

import hashlib
import json
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
from kd_lightning.llm.token_loss import IGNORE_INDEX, SparseTeacher

KEY = "llm.teacher.model"
_TOKEN_ID = "token_id:"
T = TypeVar("T")
R = TypeVar("R")


class RemoteTeacherError(RuntimeError):
    """The server could not be reached or refused a request (after the client's retries)."""


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
        if self._client is None:
            from openai import OpenAI

            key = os.environ[self.api_key_env] if self.api_key_env else "no-key"
            self._client = OpenAI(
                base_url=self.base_url, api_key=key, timeout=self.timeout, max_retries=self.max_retries
            )
        return self._client

    # ----------------------------------------------------------------------------------------- requests
    def request(self, endpoint: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """The server's answer to one request (``endpoint``: ``chat`` or ``completions``), from the cache
        when it was asked before."""
        import openai

        body = {"model": self.model, **body}
        cached = None
        if self.cache_dir is not None:
            digest = hashlib.sha256(json.dumps([self.identity, endpoint, body], sort_keys=True).encode()).hexdigest()
            cached = Path(self.cache_dir) / digest[:2] / f"{digest}.json"
            if cached.is_file():
                return json.loads(cached.read_text())
        api = self.client.chat.completions if endpoint == "chat" else self.client.completions
        extra = {key: body[key] for key in ("return_tokens_as_token_ids",) if key in body}
        sent = {key: value for key, value in body.items() if key not in extra}
        try:
            answer = api.create(**sent, extra_body=extra or None).model_dump()
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
                f"{self.base_url} answered HTTP {error.status_code} to a {endpoint} request for {self.model!r}: "
                f"{error.message}"
            ) from None
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(cached, json.dumps(answer))
        return answer

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
            choices = self.request("chat", body)["choices"]
            return [(choice["message"]["content"] or "").strip() for choice in choices]

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
        logprobs = self.request("completions", body)["choices"][0].get("logprobs") or {}
        tops = logprobs.get("top_logprobs")
        if not tops or len(tops) < len(token_ids) or all(entry is None for entry in tops[1 : len(token_ids)]):
            raise ConfigError(
                f"{self.base_url} returned no log-probabilities of the prompt tokens (echo + logprobs); grey-box "
                "token KD needs a server that scores given text (vLLM, SGLang); with any server use black-box KD "
                "instead: kd-llm-generate llm/teacher=remote, then kd-llm-distill llm/loss=sft llm/data=teacher_text"
            )
        return [None if entry is None else self._token_ids(entry) for entry in tops[: len(token_ids)]]

    def _token_ids(self, entry: Mapping[str, float]) -> dict[int, float]:
        out = {}
        for token, value in entry.items():
            if not token.startswith(_TOKEN_ID):
                raise ConfigError(
                    f"{self.base_url} names tokens by text ({token!r}), not id; the grey-box path asks for "
                    "return_tokens_as_token_ids (vLLM's option): use a server that supports it"
                )
            out[int(token[len(_TOKEN_ID) :])] = float(value)
        return out

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
                best = sorted(entry.items(), key=lambda item: -item[1])[:top_k]
                if len(best) < top_k:
                    raise ConfigError(
                        f"{self.base_url} returned {len(best)} log-probabilities per token, fewer than "
                        f"llm.mode.top_k={top_k}: lower llm.mode.top_k to what the server allows"
                    )
                if max(token for token, _ in best) >= vocab_size:
                    raise ConfigError(
                        f"{self.base_url} returned token id {max(token for token, _ in best)}, beyond the "
                        f"tokenizer's {vocab_size} tokens: {KEY}.model and llm.teacher.tokenizer must match"
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
