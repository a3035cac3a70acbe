"""Embedding scoring: how much closer the description is to activating windows than to non-activating ones.

One request per feature and condition to an OpenAI-compatible ``/embeddings`` endpoint embeds the
description and the condition's detection excerpts (held-out activating windows and verified all-zero
windows, rendered unmarked exactly as detection shows them); the score is the AUROC of the cosine
similarities (activating = positive) with a stratified bootstrap interval. No generation calls. Requests
are logged like the chat judges' (purpose ``embed:<condition>``), answers validated (one finite vector per
input, all of one dimension), retried on transient failures, and a failure becomes an error row.
"""
from __future__ import annotations

import asyncio
import datetime as _dt
import json
import math
import os
import time

import numpy as np
import openai

from .answers import AnswerError
from .client import (Attempt, FatalJudgeError, JudgeSettings, RequestFailed, RETRYABLE_STATUS, Waits, _error_text,
                     _status_message, resolve_api_key, retry_after_seconds)
from .redact import Redactor
from .metrics import auroc, auroc_interval

SCORER = "embedding"


class EmbeddingClient:
    """``settings.model`` at ``settings.base_url``; concurrency, timeout and retries as for the chat judges."""

    def __init__(self, settings: JudgeSettings, api_key: str | None = None):
        self.settings = settings
        base_url = settings.resolved_base_url()
        self._client = openai.AsyncOpenAI(api_key=api_key or resolve_api_key(base_url), base_url=base_url,
                                          max_retries=0, timeout=settings.timeout_s)
        self._limit = asyncio.Semaphore(max(1, settings.concurrency))
        self.redact = Redactor([api_key, os.environ.get("OPENAI_API_KEY")])  # nothing kept or shown holds the key
        self.waits = Waits()

    async def close(self) -> None:
        await self._client.close()

    async def embed(self, inputs: list[str]) -> tuple[str, list[Attempt]]:
        """The raw response text of the first 200; RequestFailed after the retries, FatalJudgeError on 401/403/404."""
        attempts: list[Attempt] = []
        body = {"model": self.settings.model, "input": inputs, "encoding_format": "float"}  # the SDK asks base64 otherwise
        retries = 0
        while True:
            started, clock, headers = _dt.datetime.now(_dt.timezone.utc), time.monotonic(), None
            async with self._limit:
                try:
                    raw = await asyncio.wait_for(self._client.embeddings.with_raw_response.create(
                        model=self.settings.model, input=inputs, encoding_format="float"),
                        timeout=self.settings.timeout_s)  # the whole request, not the gap between bytes
                except openai.APIStatusError as exc:
                    attempt = Attempt(body, started, time.monotonic() - clock, exc.status_code,
                                      self.redact(_error_text(exc)), self.redact(_status_message(exc)), outcome="retry")
                    attempts.append(attempt)
                    if exc.status_code in (401, 403):
                        raise FatalJudgeError(f"embeddings endpoint refused the API key (HTTP {exc.status_code})") from None
                    if exc.status_code == 404:
                        raise FatalJudgeError(f"embeddings endpoint answered 404 for model {self.settings.model!r} at "
                                              f"{self.settings.base_url_host()}") from None
                    if exc.status_code not in RETRYABLE_STATUS and exc.status_code < 500:
                        attempt.outcome = "failed"
                        raise RequestFailed(attempt.error, attempts) from None
                    headers, error = exc.response.headers, attempt.error
                except (openai.APITimeoutError, openai.APIConnectionError, asyncio.TimeoutError) as exc:
                    kind = "connection error" if type(exc) is openai.APIConnectionError else "timeout"
                    error = self.redact(f"{kind} after {time.monotonic() - clock:.1f}s: {exc}"[:500])
                    attempts.append(Attempt(body, started, time.monotonic() - clock, None, None, error, outcome="retry"))
                else:
                    text = self.redact(raw.text)
                    attempt = Attempt(body, started, time.monotonic() - clock, raw.status_code, text)
                    try:
                        attempt.prompt_tokens = (json.loads(text).get("usage") or {}).get("prompt_tokens")
                    except (ValueError, AttributeError):
                        pass
                    attempts.append(attempt)
                    return text, attempts
            if retries >= self.settings.transport_retries:
                attempts[-1].outcome = "failed"
                raise RequestFailed(f"gave up after {len(attempts)} requests: {error}", attempts)
            told = retry_after_seconds(headers)
            ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2 ** retries)
            wait = told if told is not None else ceiling * (0.5 + 0.5 * np.random.random())
            await asyncio.sleep(min(wait, getattr(self.settings, "max_wait_s", wait)))
            retries += 1


def validate_embeddings(text: str | None, n_inputs: int) -> np.ndarray:
    """(n_inputs, dim) float array in input order (``index`` honoured); anything else is an invalid answer."""
    try:
        data = json.loads(text or "")["data"]
    except (ValueError, KeyError, TypeError):
        raise AnswerError("response is not an embeddings list") from None
    if not isinstance(data, list) or len(data) != n_inputs:
        raise AnswerError(f"{len(data) if isinstance(data, list) else 'no'} embeddings for {n_inputs} inputs")
    vectors: list = [None] * n_inputs
    for i, entry in enumerate(data):
        index = entry.get("index", i) if isinstance(entry, dict) else None
        vector = entry.get("embedding") if isinstance(entry, dict) else None
        if not isinstance(index, int) or not 0 <= index < n_inputs or vectors[index] is not None:
            raise AnswerError(f"embedding {i} has a bad index {index!r}")
        if not isinstance(vector, list) or not vector or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in vector):
            raise AnswerError(f"embedding {index} is not a list of finite numbers")
        vectors[index] = vector
    if len({len(v) for v in vectors}) != 1:
        raise AnswerError("embeddings differ in dimension")
    return np.asarray(vectors, dtype=float)


def cosine_to_first(vectors: np.ndarray) -> list[float]:
    """Cosine similarity of rows 1.. to row 0 (a zero vector has similarity 0)."""
    norms = np.linalg.norm(vectors, axis=1)
    norms[norms == 0] = 1.0
    unit = vectors / norms[:, None]
    return [float(x) for x in unit[1:] @ unit[0]]


async def ask_embeddings(run, layer: int, feature: int, purpose: str, inputs: list[str]):
    """Like ``JudgeRun.ask`` for embeddings: (vectors or None, error or None, requests, tokens); every request logged."""
    from .runner import Asked

    replayed = run.take(layer, feature, purpose, inputs, lambda text: validate_embeddings(text, len(inputs)))
    if replayed is not None:  # answered before a kill, its result not yet written
        return replayed
    asked = Asked()
    problem = "no attempt made"
    for _ in range(max(1, run.client.settings.answer_attempts)):
        try:
            text, attempts = await run.client.embed(inputs)
        except RequestFailed as exc:
            run._log(layer, feature, purpose, exc.attempts, asked.n_requests + 1, asked)
            asked.error = f"request failed: {exc}"
            return asked
        try:
            asked.value = validate_embeddings(text, len(inputs))
            run._log(layer, feature, purpose, attempts, asked.n_requests + 1, asked)
            return asked
        except AnswerError as exc:
            problem = str(exc)
            attempts[-1].outcome, attempts[-1].error = "invalid", f"invalid answer: {problem}"
            run._log(layer, feature, purpose, attempts, asked.n_requests + 1, asked)
    asked.error = f"invalid answer after {run.client.settings.answer_attempts} tries: {problem}"
    return asked


async def score_embedding(run, layer: int, feature: int, detection, description: str, owner: tuple[int, int],
                          control: bool) -> dict:
    """One embeddings request for a condition's detection excerpts; returns the scorer_scores row."""
    identity = run.identity(layer, feature)
    labels = detection.labels
    base = {**identity, "scorer": SCORER, "condition": detection.condition, "control": control,
            "description_layer": owner[0], "description_feature": owner[1],
            "n_positives": detection.n_positives, "n_negatives": detection.n_negatives}
    if not detection.n_positives or not detection.n_negatives:
        missing = "held-out positives" if not detection.n_positives else "verified non-activating windows"
        return {**base, "status": "skipped", "error": f"no {missing} for this condition", "n_requests": 0}
    purpose = f"{'control-embed' if control else 'embed'}:{detection.condition}"
    asked = await ask_embeddings(run, layer, feature, purpose, [description] + list(detection.texts))
    similarities = None if asked.value is None else cosine_to_first(asked.value)
    run.writer.add("scorer_examples", [{
        **identity, **{k: item[k] for k in ("seq_id", "pos", "window_start", "window_end", "label", "act")},
        "scorer": SCORER, "condition": detection.condition, "control": control, "item": i + 1, "marks": None,
        "prediction": None, "similarity": None if similarities is None else similarities[i]}
        for i, item in enumerate(detection.items)])
    row = {**base, **asked.outcome(), "completion_tokens": None}
    if similarities is not None:
        row["auroc"] = row["score"] = auroc(labels, similarities)
        row["ci_low"], row["ci_high"] = auroc_interval(labels, similarities)
    return row
