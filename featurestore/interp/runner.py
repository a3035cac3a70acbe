"""What classify and autointerp share: run identity and resume, asking with answer validation, concurrency.

A run is identified by the settings that decide its answers (judge model, endpoint host, prompt version,
evidence settings, seed); running the same command again resumes the latest such run and requests only
what it has not finished. ``rerun=True`` starts a new run. Evidence is built in one background thread
(the store's DuckDB connection is used by that thread only) while up to ``concurrency`` requests are in
flight; every request and every result is handed to the writer as soon as it completes.
"""
from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import secrets
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

from tqdm.auto import tqdm

from ..errors import UserError
from .answers import AnswerError
from .client import Completion, JudgeClient, JudgeSettings, RequestFailed
from .tables import InterpWriter, latest_run, now, request_rows

_STOP = object()


@dataclass
class Asked:
    """The outcome of one judge question, after answer retries."""

    value: Any = None
    error: str | None = None
    n_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raw: str | None = None

    def outcome(self) -> dict:
        return {"status": "ok" if self.error is None else "error", "error": self.error, "n_requests": self.n_requests,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass
class RunSummary:
    run_id: str
    kind: str
    resumed: bool
    n_selected: int
    n_already_done: int
    counts: dict[str, int] = field(default_factory=dict)  # status -> features
    n_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    report: str = ""
    n_failed: int = 0  # selected features whose latest result in this run is an error (the CLI exits 1)


def settings_hash(kind: str, judge: JudgeSettings, prompt_version: str, extra: dict) -> str:
    decisive = {"kind": kind, "model": judge.model, "host": judge.base_url_host(), "prompt": prompt_version,
                "max_output_tokens": judge.max_output_tokens, "temperature": judge.temperature, **extra}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()[:12]


def open_run(root, kind: str, judge: JudgeSettings, prompt_version: str, decisive: dict, invocation: dict,
             rerun: bool, run_id: str | None) -> tuple[str, bool, dict]:
    """(run_id, resumed, runs-row). Explicit ``run_id`` resumes or creates that run."""
    digest = settings_hash(kind, judge, prompt_version, decisive)
    if run_id is None and not rerun:
        previous = latest_run(root, kind, digest)
        if previous is not None:
            run_id = previous["run_id"]
    started = now()
    existing = latest_run_by_id(root, run_id) if run_id is not None else None
    if existing is not None and (existing["kind"], existing["settings_hash"]) != (kind, digest):
        raise UserError(f"run {run_id} was made by {existing['kind']} with other settings (model "
                        f"{existing['judge_model']} at {existing['base_url_host']}, prompt {existing['prompt_version']}); "
                        "resume it with the same options or use another --run-id")
    resumed = existing is not None
    if run_id is None:
        run_id = f"{kind[:3]}-{started.strftime('%Y%m%dT%H%M%S')}-{digest[:6]}{secrets.token_hex(2)}"
    elif not run_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"bad run id {run_id!r}: letters, digits, - _ . only")
    row = {"run_id": run_id, "kind": kind, "settings_hash": digest, "judge_model": judge.model,
           "base_url_host": judge.base_url_host(), "prompt_version": prompt_version,
           "settings": json.dumps({**invocation, **decisive, "judge": _public(judge)}, sort_keys=True, default=str),
           "started_at": started}
    return run_id, resumed, row


class RunLock:
    """One process per run: a second invocation of the same run fails fast instead of paying twice.
    Taken before the finished features are read, released when the run's files are all written."""

    def __init__(self, root, run_id: str):
        directory = Path(root) / "interp"
        directory.mkdir(parents=True, exist_ok=True)
        self._handle = open(directory / f".{run_id}.lock", "w")
        try:
            fcntl.flock(self._handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise UserError(f"run {run_id} is being written by another process") from None

    def release(self) -> None:
        if not self._handle.closed:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()


def latest_run_by_id(root, run_id: str) -> dict | None:
    from .tables import read_rows

    rows = read_rows(root, "runs", run_id)
    return rows[-1] if rows else None


def _public(judge: JudgeSettings) -> dict:
    """Judge settings as stored: the full base URL is reduced to its host (it may embed credentials)."""
    data = asdict(judge)
    data["base_url"] = judge.base_url_host()
    return data


class JudgeRun:
    """One invocation: the client, the writer, the run's identity columns, token and request accounting."""

    def __init__(self, store, client: JudgeClient, writer: InterpWriter, run_id: str, source: str,
                 prompt_version: str, progress: bool):
        self.store, self.client, self.writer = store, client, writer
        self.run_id, self.source, self.prompt_version = run_id, source, prompt_version
        self.progress = progress
        self.n_requests = self.prompt_tokens = self.completion_tokens = 0
        self.n_failed_questions = 0
        self.listener: Callable[[], None] | None = None
        client.waits.listener = self._changed

    def _changed(self) -> None:
        if self.listener is not None:
            self.listener()

    def text(self) -> str:
        """The progress line's postfix: questions that ended in error, requests waiting to be retried."""
        parts = [f"{self.n_failed_questions} failed"] if self.n_failed_questions else []
        waiting = self.client.waits.text()
        return "; ".join(parts + ([waiting] if waiting else []))

    def identity(self, layer: int, feature: int) -> dict:
        return {"run_id": self.run_id, "source": self.source, "layer": layer, "feature": feature,
                "judge_model": self.client.settings.model, "base_url_host": self.client.settings.base_url_host(),
                "prompt_version": self.prompt_version, "created_at": now()}

    def _log(self, layer: int, feature: int, purpose: str, attempts, first: int, asked: Asked) -> None:
        self.writer.add("requests", request_rows(self.run_id, self.source, layer, feature, purpose, attempts, first))
        for a in attempts:
            asked.n_requests += 1
            asked.prompt_tokens += a.prompt_tokens or 0
            asked.completion_tokens += a.completion_tokens or 0
        self.n_requests += len(attempts)
        self.prompt_tokens += sum(a.prompt_tokens or 0 for a in attempts)
        self.completion_tokens += sum(a.completion_tokens or 0 for a in attempts)

    async def ask(self, layer: int, feature: int, purpose: str, messages: list[dict], schema_name: str, schema: dict,
                  validate: Callable[[str | None], Any], max_tokens: int | None = None) -> Asked:
        """Ask until the answer validates (``answer_attempts`` times); the last problem becomes the error."""
        asked = Asked()
        problem = "no attempt made"
        for _ in range(max(1, self.client.settings.answer_attempts)):
            try:
                completion: Completion = await self.client.complete(messages, schema_name, schema, max_tokens)
            except RequestFailed as exc:
                self._log(layer, feature, purpose, exc.attempts, asked.n_requests + 1, asked)
                asked.error = f"request failed: {exc}"
                self.n_failed_questions += 1
                self._changed()
                return asked
            last = completion.attempts[-1]
            try:
                if completion.text is None and completion.finish_reason == "length":
                    raise AnswerError(f"answer cut off at the token limit ({self.client.settings.max_output_tokens})")
                asked.value = validate(completion.text)
                asked.raw = completion.text
                last.outcome = "ok"
                self._log(layer, feature, purpose, completion.attempts, asked.n_requests + 1, asked)
                return asked
            except AnswerError as exc:
                problem = str(exc)
                last.outcome, last.error = "invalid", f"invalid answer: {problem}"
                self._log(layer, feature, purpose, completion.attempts, asked.n_requests + 1, asked)
        asked.error = f"invalid answer after {self.client.settings.answer_attempts} tries: {problem}"
        self.n_failed_questions += 1
        self._changed()
        return asked


def batches_by_layer(items: list[tuple[int, int]], size: int) -> list[tuple[int, list[int]]]:
    """(layer, features) groups of at most ``size``, in layer order: the unit of evidence building."""
    by_layer: dict[int, list[int]] = {}
    for layer, feature in items:
        by_layer.setdefault(layer, []).append(feature)
    return [(layer, feats[i:i + size]) for layer, feats in sorted(by_layer.items()) for i in range(0, len(feats), size)]


async def pipeline(batches: list[tuple[int, list[int]]], prepare: Callable[[int, list[int]], list],
                   handle: Callable[[Any], Awaitable[None]], workers: int, desc: str, progress: bool,
                   tick: Callable[[], None] | None = None, tick_seconds: float = 5.0, status=None) -> None:
    """``prepare`` (blocking store queries, one batch at a time) runs in a background thread ahead of the
    ``workers`` async handlers; a failed batch becomes one PrepareFailed job per feature. ``tick`` (the
    writer's flush) runs every ``tick_seconds`` even while every request is still waiting. ``status`` (a
    JudgeRun) supplies the progress line's postfix, refreshed when it changes and every second."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=max(2, 2 * workers))
    total = sum(len(features) for _, features in batches)
    bar = tqdm(total=total, desc=desc, unit="feature", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evidence")
    shown = [""]

    def show() -> None:
        text = status.text()
        if text != shown[0]:
            shown[0] = text
            bar.set_postfix_str(text, refresh=True)

    if status is not None and progress:
        status.listener = show

    def guarded(layer: int, features: list[int]) -> list:
        try:
            return prepare(layer, features)
        except UserError:
            raise
        except Exception as exc:  # recorded per feature, never dropped
            error = f"evidence: {type(exc).__name__}: {exc}"[:500]
            return [PrepareFailed((layer, f), error) for f in features]

    async def producer() -> None:
        for layer, features in batches:
            for job in await loop.run_in_executor(executor, guarded, layer, features):
                await queue.put(job)
        for _ in range(workers):
            await queue.put(_STOP)

    async def worker() -> None:
        while True:
            job = await queue.get()
            if job is _STOP:
                return
            await handle(job)
            bar.update(1)

    async def ticker() -> None:
        while True:
            await asyncio.sleep(tick_seconds)
            tick()

    async def countdown() -> None:
        while True:
            await asyncio.sleep(1.0)
            show()

    tasks = [asyncio.ensure_future(producer())] + [asyncio.ensure_future(worker()) for _ in range(max(1, workers))]
    clocks = [asyncio.ensure_future(ticker())] if tick else []
    if status is not None and progress:
        clocks.append(asyncio.ensure_future(countdown()))
    try:
        await asyncio.gather(*tasks)
    finally:
        for clock in clocks:
            clock.cancel()
        if status is not None:
            status.listener = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        executor.shutdown(wait=True, cancel_futures=True)
        bar.close()


@dataclass
class PrepareFailed:
    item: Any
    error: str
