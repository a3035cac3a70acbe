"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions API, for tests and benchmarks.

Behaviour is scripted by a responder ``(body, n) -> Reply`` where ``body`` is the parsed request and ``n``
the 0-based index of the request. Every request is recorded (``stub.requests``) so tests can count what
a run actually paid for. ``AutoJudge`` answers the featurestore judge schemas validly; ``Embedder`` answers
``/embeddings`` requests (``embedder`` argument) with vectors from a function of each input text.

Run by hand: ``python tests/openai_stub.py --port 8011 --latency 0.2`` (answers like ``AutoJudge``).
"""
from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


@dataclass
class Reply:
    status: int = 200
    content: str | None = None  # the assistant message for a 200
    body: dict | str | None = None  # a whole response body instead (errors, odd shapes)
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    finish_reason: str = "stop"
    usage: tuple[int, int] = (100, 20)
    trickle_s: float = 0.0  # send the body one byte every trickle_s seconds (a server that never quite stalls)


def error_reply(status: int, message: str, *, param: str | None = None, headers: dict | None = None,
                type_: str = "invalid_request_error") -> Reply:
    """An error body shaped like OpenAI's ``{"error": {message, type, param, code}}``."""
    return Reply(status=status, body={"error": {"message": message, "type": type_, "param": param, "code": None}},
                 headers=headers or {})


def completion_body(content: str | None, model: str, usage: tuple[int, int], finish_reason: str, n: int) -> dict:
    return {
        "id": f"chatcmpl-stub-{n}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
    }


def schema_name(body: dict) -> str | None:
    fmt = body.get("response_format") or {}
    return (fmt.get("json_schema") or {}).get("name") if fmt.get("type") == "json_schema" else None


def prompt_text(body: dict) -> str:
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))


FEATURE_ID = re.compile(r"\bL(\d+)F(\d+)\b")


def feature_of(body: dict) -> tuple[int, int] | None:
    """(layer, feature) named in a classify or explain prompt as ``L<layer>F<feature>``."""
    match = FEATURE_ID.search(prompt_text(body))
    return (int(match.group(1)), int(match.group(2))) if match else None


def detection_items(body: dict) -> int:
    """How many excerpts a detection request asks about (from the schema, else from the prompt)."""
    fmt = body.get("response_format") or {}
    schema = (fmt.get("json_schema") or {}).get("schema")
    if schema:
        return len(schema["properties"])
    return len(re.findall(r"^Excerpt (\d+):", prompt_text(body), re.M))


def request_kind(body: dict) -> str:
    text = prompt_text(body)
    if "feature_classification" == schema_name(body) or "Classify feature" in text:
        return "classify"
    if "feature_explanation" == schema_name(body) or "Describe feature" in text:
        return "explain"
    if "feature_fuzzing" == schema_name(body) or "marking is right" in text:
        return "fuzz"
    if "input" in body and "messages" not in body:
        return "embed"
    return "detect"


class AutoJudge:
    """Valid answers for every kind of request; override ``detect`` to script predictions."""

    def __init__(self, category: str = "reasoning", delay_s: float = 0.0):
        self.category = category
        self.delay_s = delay_s

    def classify(self, body: dict) -> dict:
        category = self.category
        return {"reasoning": "fires on hedging", "category": category, "confidence": "high",
                "domain_type": "math" if category == "domain" else None,
                "mechanism": "input_simple" if category == "reasoning" else None,
                "category_description": "hedging tokens such as Wait", "mechanism_description": None,
                "input_pattern": "Wait", "output_pattern": None}

    def explain(self, body: dict) -> dict:
        where = feature_of(body) or (0, 0)
        return {"reasoning": "the marked tokens share a pattern",
                "description": f"fires on tokens of feature {where[0]} {where[1]} inside reasoning steps of math traces"}

    def detect(self, body: dict, n_items: int) -> list[bool]:
        return [i % 2 == 0 for i in range(n_items)]

    def fuzz(self, body: dict, n_items: int) -> list[bool]:
        return [i % 2 == 1 for i in range(n_items)]

    def __call__(self, body: dict, n: int) -> Reply:
        kind = request_kind(body)
        if kind in ("detect", "fuzz"):
            k = detection_items(body)
            answer = {str(i + 1): bool(v) for i, v in enumerate(getattr(self, kind)(body, k))}
        else:
            answer = getattr(self, kind)(body)
        return Reply(content=json.dumps(answer), delay_s=self.delay_s)


def embedding_body(vectors: list[list[float]], model: str) -> dict:
    return {"object": "list", "model": model, "usage": {"prompt_tokens": 10 * len(vectors), "total_tokens": 10 * len(vectors)},
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}


class Embedder:
    """``/embeddings``: ``vector(text)`` per input (default: letter counts of a-h, so similar texts are close)."""

    def __init__(self, vector: Callable[[str], list[float]] | None = None, delay_s: float = 0.0):
        self.vector = vector or (lambda text: [float(text.lower().count(c)) + 0.5 for c in "abcdefgh"])
        self.delay_s = delay_s

    def __call__(self, body: dict, n: int) -> Reply:
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else list(inputs or [])
        return Reply(body=embedding_body([self.vector(t) for t in inputs], body.get("model", "stub")), delay_s=self.delay_s)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 512  # the default backlog of 5 drops connections when 32+ clients connect at once


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: without this, delayed ACKs add ~40 ms

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        stub: OpenAIStub = self.server.stub  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        n = stub.record(self.path, body, {k.lower(): v for k, v in self.headers.items()})
        if self.path.rstrip("/").endswith("/embeddings"):
            reply = stub.embedder(body, n)
        elif not self.path.rstrip("/").endswith("/chat/completions"):
            reply = error_reply(404, f"no route {self.path}")
        else:
            reply = stub.responder(body, n)
        if reply.delay_s:
            time.sleep(reply.delay_s)
        if reply.body is not None:
            payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
        else:
            payload = json.dumps(completion_body(reply.content, body.get("model", "stub"), reply.usage,
                                                 reply.finish_reason, n))
        data = payload.encode()
        try:
            self.send_response(reply.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            for key, value in reply.headers.items():
                self.send_header(key, str(value))
            self.end_headers()
            if reply.trickle_s:
                for i in range(len(data)):
                    self.wfile.write(data[i:i + 1])
                    self.wfile.flush()
                    time.sleep(reply.trickle_s)
            else:
                self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): that is the behaviour under test


class OpenAIStub:
    """``with OpenAIStub(responder) as stub: stub.base_url`` → ``http://127.0.0.1:<port>/v1``."""

    def __init__(self, responder: Callable[[dict, int], Reply] | None = None,
                 embedder: Callable[[dict, int], Reply] | None = None):
        self.responder = responder or AutoJudge()
        self.embedder = embedder or Embedder()
        self.requests: list[dict] = []  # {"path", "body", "headers", "at"}
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.stub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def record(self, path: str, body: dict, headers: dict) -> int:
        with self._lock:
            self.requests.append({"path": path, "body": body, "headers": headers, "at": time.monotonic()})
            return len(self.requests) - 1

    def bodies(self, kind: str | None = None) -> list[dict]:
        """Request bodies (``kind``: only ``chat`` or only ``embeddings`` requests)."""
        with self._lock:
            return [r["body"] for r in self.requests
                    if kind is None or r["path"].rstrip("/").endswith("/" + ("chat/completions" if kind == "chat" else kind))]

    def start(self) -> "OpenAIStub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "OpenAIStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8011, help="0: any free port (the URL is printed)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    args = parser.parse_args()
    stub = OpenAIStub(AutoJudge(delay_s=args.latency))
    if args.port:
        stub._server.server_close()
        stub._server = _Server(("127.0.0.1", args.port), _Handler)
        stub._server.stub = stub  # type: ignore[attr-defined]
    print(f"serving {stub.base_url}", flush=True)
    try:
        stub._server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
