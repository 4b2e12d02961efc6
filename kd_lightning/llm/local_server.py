"""A minimal OpenAI-compatible server: a Hugging Face causal LM served on 127.0.0.1 (stdlib HTTP, one model
call at a time), for tests and CPU demos of ``llm/teacher=remote``; serve real teachers with vLLM or SGLang.

``/v1/chat/completions`` (greedy or sampled completions of a chat) and ``/v1/completions`` with
vLLM's prompt scoring (``prompt`` as token ids, ``echo``, ``logprobs``, ``return_tokens_as_token_ids``).
Faults for the client's error paths: ``fail_first`` requests answered 503, a ``delay`` before each
answer, ``logprobs=False`` (a server that never returns log-probabilities). Counts requests and the most
in flight at once.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch
import torch.nn.functional as F


class JSONServer:
    """A stdlib HTTP server on 127.0.0.1 (an ephemeral port) answering each POSTed JSON body with
    :meth:`respond`: ``with Server(...) as server: ... server.base_url`` serves until the block ends."""

    def __init__(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, answer, headers = server.respond(self.path, body)
                data = b"" if answer is None else json.dumps(answer).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Polls for shutdown every 50 ms (the default 0.5 s made every `with` block end half a second late).
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> Any:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def respond(self, path: str, body: dict) -> tuple[int, dict | None, dict[str, str]]:
        """``(HTTP status, JSON answer or None for no body, extra headers)`` of one request."""
        raise NotImplementedError


class OpenAIServer(JSONServer):
    """``with OpenAIServer(model, tokenizer) as server: ... server.base_url``: serves until the block ends."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "tiny") -> None:
        super().__init__()
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.fail_first, self.delay, self.logprobs = 0, 0.0, True
        self.requests, self.in_flight, self.max_in_flight = 0, 0, 0
        self.lock, self.model_lock = threading.Lock(), threading.Lock()

    def respond(self, path: str, body: dict) -> tuple[int, dict | None, dict[str, str]]:
        return (*self.answer(path, body), {})

    def answer(self, path: str, body: dict) -> tuple[int, dict]:
        """``(HTTP status, JSON answer)`` of one request, with the configured faults."""
        with self.lock:
            self.requests += 1
            number = self.requests
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if number <= self.fail_first:
                return 503, {"error": {"message": "overloaded", "type": "server_error"}}
            with self.model_lock, torch.no_grad():
                if path.endswith("/chat/completions"):
                    return 200, self.chat(body)
                if path.endswith("/completions"):
                    return 200, self.score(body)
            return 404, {"error": {"message": f"no route {path}"}}
        finally:
            with self.lock:
                self.in_flight -= 1

    def chat(self, body: dict) -> dict:
        """``/v1/chat/completions``: ``n`` completions, greedy at temperature 0, else sampled (seeded)."""
        ids = self.tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        prompt = torch.tensor([ids])
        sampling = {"do_sample": True, "temperature": body["temperature"], "top_p": body.get("top_p", 1.0)}
        if not body.get("temperature"):
            sampling = {"do_sample": False}
        choices = []
        for index in range(body.get("n", 1)):
            torch.manual_seed((body.get("seed") or 0) + index)
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=body["max_tokens"],
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                **sampling,
            )
            text = self.tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)
            choices.append({"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
        return {"id": "chat-1", "object": "chat.completion", "created": 0, "model": self.name, "choices": choices}

    def score(self, body: dict) -> dict:
        """``/v1/completions`` with ``echo``: the top-``logprobs`` of every prompt position (vLLM's format with
        ``return_tokens_as_token_ids``), plus one greedy token."""
        ids = torch.tensor([body["prompt"]])
        log_probs = F.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
        k = body.get("logprobs") or 0
        tops: list[dict[str, float] | None] = [None]
        for row in range(ids.shape[1]):  # row j predicts token j + 1; the last row the generated token
            values, tokens = log_probs[row].topk(k)
            tops.append({f"token_id:{int(t)}": float(v) for t, v in zip(tokens, values, strict=True)})
        generated = int(log_probs[-1].argmax())
        tokens = [*body["prompt"], generated]
        logprobs = {
            "tokens": [f"token_id:{t}" for t in tokens],
            "token_logprobs": [None, *(float(log_probs[j, tokens[j + 1]]) for j in range(len(tokens) - 1))],
            "top_logprobs": tops,
            "text_offset": list(range(len(tokens))),
        }
        choice = {"index": 0, "text": "", "finish_reason": "length", "logprobs": logprobs if self.logprobs else None}
        return {"id": "cmpl-1", "object": "text_completion", "created": 0, "model": self.name, "choices": [choice]}
