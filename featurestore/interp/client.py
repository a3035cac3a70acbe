"""One chat-completions call to any OpenAI-compatible endpoint, with the retries a long judge run needs.

The real ``openai.AsyncOpenAI`` client does the HTTP; its own retries are off so that every request is
counted and logged here. Transient failures (429, 5xx, timeouts, dropped connections) back off
exponentially and honour ``Retry-After``.

Deadlines hold: ``timeout_s`` bounds each whole request (``asyncio.wait_for`` around it, not only the gap
between bytes that the HTTP client's own timeout measures); every wait between tries is at most
``max_wait_s`` (a ``Retry-After`` asking for longer ends the question at once: the endpoint will not serve it
sooner); and one question, all its tries and waits together, never takes more than ``budget_s``. A question
that runs out becomes an error row, retried when the run is resumed.

A 400 that names a parameter the endpoint does not take (``max_tokens`` on reasoning models,
``response_format`` json_schema, ``temperature``) switches the client to the alternative once, for every
later request too. The API key is read from the environment or a
``.env`` file and is never logged or stored: everything kept from a response goes through ``redact.Redactor``.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import openai

from ..errors import UserError
from .redact import Redactor

DEFAULT_BASE_URL = "https://api.openai.com/v1"
MAX_WAIT_S = 60.0  # default cap on any one wait between tries (Retry-After or backoff)
BUDGET_S = 600.0  # default cap on one question: every try and wait together
RETRYABLE_STATUS = {408, 409, 425, 429}
REASONING_MODEL_PREFIXES = ("o1", "o3", "o4", "gpt-5")
FORMAT_MODES = ("json_schema", "json_object", "none")


@dataclass
class JudgeSettings:
    """What decides how requests are sent; ``model`` and ``base_url`` also go into every result row."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    concurrency: int = 32
    timeout_s: float = 120.0
    max_output_tokens: int = 4096
    temperature: float | None = None
    answer_attempts: int = 3  # invalid answers are asked again this many times in all
    transport_retries: int = 6  # extra tries after 429/5xx/timeouts per request
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_wait_s: float = MAX_WAIT_S  # longest wait between tries; a longer Retry-After fails the question
    budget_s: float = BUDGET_S  # longest one question may take, tries and waits included

    def resolved_base_url(self) -> str:
        return (self.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")

    def base_url_host(self) -> str:
        """host[:port] of the endpoint, without any credentials embedded in the URL."""
        parts = urlsplit(self.resolved_base_url())
        host = parts.hostname or parts.path
        return f"{host}:{parts.port}" if parts.port else host


def read_dotenv_key(name: str, directory: Path | None = None) -> str | None:
    """``NAME=value`` from ``.env`` in ``directory`` (default: the working directory), quotes stripped."""
    path = (directory or Path.cwd()) / ".env"
    if not path.is_file():
        return None
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.split("=", 1)
        if key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            return value or None
    return None


def resolve_api_key(base_url: str) -> str:
    key = os.environ.get("OPENAI_API_KEY") or read_dotenv_key("OPENAI_API_KEY")
    if key:
        return key
    if urlsplit(base_url).hostname == urlsplit(DEFAULT_BASE_URL).hostname:
        raise UserError("no API key: set OPENAI_API_KEY or put OPENAI_API_KEY=... in ./.env")
    return "EMPTY"  # local servers (vLLM, Ollama) accept any key


@dataclass
class Attempt:
    """One HTTP request: exactly what was sent and what came back (kept, compressed, for audit)."""

    body: dict
    started_at: _dt.datetime
    latency_s: float
    http_status: int | None = None
    response_text: str | None = None
    error: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    outcome: str = "ok"  # ok | invalid | retry | failed (set by the caller for answer validity)


@dataclass
class Completion:
    text: str | None
    finish_reason: str | None
    attempts: list[Attempt] = field(default_factory=list)


class RequestFailed(Exception):
    """The request could not be completed after the retries; ``attempts`` holds every HTTP request made."""

    def __init__(self, message: str, attempts: list[Attempt]):
        super().__init__(message)
        self.attempts = attempts


class FatalJudgeError(UserError):
    """Every request would fail the same way (bad key, unknown model): stop the run."""


def retry_after_seconds(headers) -> float | None:
    """``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date) as the endpoint said it (not capped)."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000.0
            if seconds == seconds:
                return max(seconds, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(seconds, 0.0) if seconds == seconds else None  # NaN: no usable advice
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    return max((when - _dt.datetime.now(_dt.timezone.utc)).total_seconds(), 0.0)


def _status_message(exc: openai.APIStatusError) -> str:
    """``HTTP 429: <the endpoint's own message>``."""
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body)
    message = inner.get("message") if isinstance(inner, dict) else None
    return f"HTTP {exc.status_code}: {message or _error_text(exc)}"[:500]


def _error_text(exc: openai.APIStatusError) -> str:
    try:
        return exc.response.text
    except Exception:  # the body may already be closed
        return str(exc)


class Waits:
    """Requests now waiting to be retried, for the progress line; ``listener`` is told when that changes."""

    def __init__(self):
        self._until: dict[int, tuple[float, str]] = {}
        self.listener: Callable[[], None] | None = None
        self.n_waits = 0
        self.waited_s = 0.0

    def text(self) -> str:
        if not self._until:
            return ""
        clock = time.monotonic()
        longest = max(until - clock for until, _ in self._until.values())
        reasons = sorted({why for _, why in self._until.values()})
        return f"{len(self._until)} waiting to retry (up to {max(longest, 0.0):.0f}s: {', '.join(reasons)})"

    async def wait(self, seconds: float, why: str) -> None:
        token = id(asyncio.current_task())
        self._until[token] = (time.monotonic() + seconds, why)
        self.n_waits += 1
        self.waited_s += seconds
        self._notify()
        try:
            await asyncio.sleep(seconds)
        finally:
            self._until.pop(token, None)
            self._notify()

    def _notify(self) -> None:
        if self.listener is not None:
            self.listener()


class JudgeClient:
    """Shared by all requests of a run: one connection pool, one concurrency limit, one adapted parameter set."""

    def __init__(self, settings: JudgeSettings, api_key: str | None = None):
        self.settings = settings
        base_url = settings.resolved_base_url()
        api_key = api_key or resolve_api_key(base_url)
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=base_url, max_retries=0, timeout=settings.timeout_s)
        self.redact = Redactor([api_key, os.environ.get("OPENAI_API_KEY")])
        self.waits = Waits()
        self._limit = asyncio.Semaphore(max(1, settings.concurrency))
        self.format_mode = "json_schema"
        reasoning = settings.model.split("/")[-1].lower().startswith(REASONING_MODEL_PREFIXES)
        self.token_param = "max_completion_tokens" if reasoning else "max_tokens"
        self.send_temperature = settings.temperature is not None
        self._tried_token_params: set[str] = set()

    async def close(self) -> None:
        await self._client.close()

    def request_body(self, messages: list[dict], schema_name: str, schema: dict, max_tokens: int | None) -> dict:
        """The JSON body for the current adaptation state (what the endpoint receives, minus the model key)."""
        body: dict = {"model": self.settings.model, "messages": messages}
        if self.format_mode == "json_schema":
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": schema_name, "strict": True, "schema": schema}}
        elif self.format_mode == "json_object":
            body["response_format"] = {"type": "json_object"}
        body[self.token_param] = max_tokens or self.settings.max_output_tokens
        if self.send_temperature:
            body["temperature"] = self.settings.temperature
        return body

    def _adapt(self, exc: openai.APIStatusError) -> bool:
        """Switch away from a parameter the endpoint rejected; False when the 400 is about something else."""
        text = _error_text(exc).lower()
        param = ""
        body = exc.body if isinstance(exc.body, dict) else {}
        inner = body.get("error", body) if isinstance(body, dict) else {}
        if isinstance(inner, dict):
            param = str(inner.get("param") or "").lower()

        def mentions(name: str) -> bool:
            return param == name or name in text

        self._tried_token_params.add(self.token_param)
        other = "max_completion_tokens" if self.token_param == "max_tokens" else "max_tokens"
        if mentions(self.token_param) and other not in self._tried_token_params:
            self.token_param = other
            return True
        if self.format_mode != "none" and (mentions("response_format") or "json_schema" in text
                                           or "json_object" in text or "structured output" in text):
            self.format_mode = FORMAT_MODES[FORMAT_MODES.index(self.format_mode) + 1]
            return True
        if self.send_temperature and mentions("temperature"):
            self.send_temperature = False
            return True
        return False

    def _wait_before_retry(self, retry: int, headers, spent: float) -> tuple[float | None, str]:
        """(seconds to wait, why), or (None, why not) when the question should end now."""
        s = self.settings
        told = retry_after_seconds(headers)
        if told is not None:
            if told > s.max_wait_s:
                return None, f"endpoint asked to retry after {told:.0f}s, more than the {s.max_wait_s:g}s wait cap"
            wait, why = told, "Retry-After"
        else:
            ceiling = min(s.backoff_max_s, s.max_wait_s, s.backoff_base_s * 2 ** retry)
            wait, why = random.uniform(ceiling / 2, ceiling), "backoff"
        if spent + wait >= s.budget_s:
            return None, f"question budget of {s.budget_s:g}s spent"
        return wait, why

    def _attempt(self, body: dict, started, latency: float, status: int | None, response: str | None,
                 error: str | None, outcome: str) -> Attempt:
        return Attempt(body, started, latency, status, self.redact(response), self.redact(error), outcome=outcome)

    async def complete(self, messages: list[dict], schema_name: str, schema: dict,
                       max_tokens: int | None = None) -> Completion:
        """Send until a 200 arrives; raise RequestFailed after the retries or the budget, FatalJudgeError on 401/403/404."""
        attempts: list[Attempt] = []
        retries = 0
        adaptations = 0
        spent = 0.0  # in requests and waits; not in the queue for a concurrency slot
        while True:
            body = self.request_body(messages, schema_name, schema, max_tokens)
            params = {k: v for k, v in body.items() if k not in ("model", "messages")}
            logged = self.redact.deep(body)
            headers = None
            async with self._limit:
                started = _dt.datetime.now(_dt.timezone.utc)
                clock = time.monotonic()
                deadline = max(0.0, min(self.settings.timeout_s, self.settings.budget_s - spent))
                try:
                    raw = await asyncio.wait_for(self._client.chat.completions.with_raw_response.create(
                        model=self.settings.model, messages=messages, **params), timeout=deadline)
                except openai.APIStatusError as exc:
                    attempt = self._attempt(logged, started, time.monotonic() - clock, exc.status_code,
                                            _error_text(exc), _status_message(exc), "retry")
                    attempts.append(attempt)
                    status = exc.status_code
                    if status in (401, 403):
                        raise FatalJudgeError(f"endpoint refused the API key (HTTP {status}); check OPENAI_API_KEY") from None
                    if status == 404:
                        raise FatalJudgeError(self.redact(f"endpoint answered 404 for model {self.settings.model!r} at "
                                                          f"{self.settings.base_url_host()}: {attempt.error}")[:300]) from None
                    if status in (400, 422) and adaptations < 6 and self._adapt(exc):
                        adaptations += 1
                        continue
                    if status not in RETRYABLE_STATUS and status < 500:
                        attempt.outcome = "failed"
                        raise RequestFailed(attempt.error, attempts) from None
                    headers = exc.response.headers
                    error = attempt.error
                except (openai.APITimeoutError, asyncio.TimeoutError):
                    error = f"timeout: no complete answer within {deadline:g}s"
                    attempts.append(self._attempt(logged, started, time.monotonic() - clock, None, None, error, "retry"))
                except openai.APIConnectionError as exc:
                    error = f"connection error after {time.monotonic() - clock:.1f}s: {exc}"[:500]
                    attempts.append(self._attempt(logged, started, time.monotonic() - clock, None, None, error, "retry"))
                else:
                    return self._completion(raw, logged, started, time.monotonic() - clock, attempts)
                finally:
                    spent += time.monotonic() - clock
            error = self.redact(error)
            if retries >= self.settings.transport_retries:
                attempts[-1].outcome = "failed"
                raise RequestFailed(f"gave up after {len(attempts)} requests: {error}", attempts)
            wait, why = self._wait_before_retry(retries, headers, spent)
            if wait is None:
                attempts[-1].outcome = "failed"
                raise RequestFailed(f"gave up after {len(attempts)} requests ({why}): {error}", attempts)
            await self.waits.wait(wait, why)
            spent += wait
            retries += 1

    def _completion(self, raw, body: dict, started, latency: float, attempts: list[Attempt]) -> Completion:
        text = raw.text
        attempt = Attempt(body, started, latency, raw.status_code, self.redact(text))
        attempts.append(attempt)
        try:
            data = json.loads(text)
            choice = (data.get("choices") or [{}])[0]
            content = self.redact((choice.get("message") or {}).get("content"))
            finish = choice.get("finish_reason")
            usage = data.get("usage") or {}
            attempt.prompt_tokens = usage.get("prompt_tokens")
            attempt.completion_tokens = usage.get("completion_tokens")
        except (ValueError, AttributeError, TypeError):
            content, finish = None, None
            attempt.error = "response body is not a chat completion"
        return Completion(content, finish, attempts)
