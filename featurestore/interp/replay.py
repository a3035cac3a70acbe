"""Resume without paying twice, even for a request whose answer was logged but whose result row was not.

A run killed between writing a request's log row and the result row it led to would otherwise ask that
question again on resume. On resume, the answers of the run's successful requests (outcome ``ok`` in the
requests table) for the features still to do are loaded, keyed by what was asked (feature, purpose and the
messages or embedding inputs); ``ScoringRun.ask`` and the embedding scorer take an answer from there
(validated again) before sending anything.
"""
from __future__ import annotations

import hashlib
import json

import duckdb

from .runner import Asked, JudgeRun
from .tables import _glob, _has_files, decompress_text


def replay_key(layer: int, feature: int, purpose: str, asked) -> str:
    blob = json.dumps([layer, feature, purpose, asked], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_replay(root, run_id: str, features: list[tuple[int, int]]) -> dict[str, str]:
    """replay key -> answer text (chat: the message content; embeddings: the raw response) of ok requests."""
    from pathlib import Path

    root = Path(root)
    if not features or not _has_files(root, "requests", run_id):
        return {}
    con = duckdb.connect()
    try:
        con.execute("CREATE TEMP TABLE wanted (layer INTEGER, feature INTEGER)")
        con.executemany("INSERT INTO wanted VALUES (?, ?)", features)
        rows = con.execute(
            "SELECT r.layer, r.feature, r.purpose, r.request_zstd, r.response_zstd FROM read_parquet(?, "
            "hive_partitioning=false, union_by_name=true) r JOIN wanted USING (layer, feature) WHERE r.outcome = 'ok'",
            [_glob(root, "requests", run_id)]).fetchall()
    finally:
        con.close()
    out = {}
    for layer, feature, purpose, request, response in rows:
        try:
            body = json.loads(decompress_text(request))
            text = decompress_text(response)
            if "messages" in body:
                asked, answer = body["messages"], json.loads(text)["choices"][0]["message"]["content"]
            else:
                asked, answer = body["input"], text
        except (ValueError, KeyError, IndexError, TypeError):
            continue
        if answer is not None:
            out[replay_key(layer, feature, purpose, asked)] = answer
    return out


class ScoringRun(JudgeRun):
    """A JudgeRun that first looks for the answer among the logged answers of the run it resumes."""

    replay: dict[str, str]

    def take(self, layer: int, feature: int, purpose: str, asked, validate) -> Asked | None:
        text = getattr(self, "replay", {}).pop(replay_key(layer, feature, purpose, asked), None)
        if text is None:
            return None
        try:
            return Asked(value=validate(text), raw=text)
        except ValueError:  # AnswerError: not a usable answer after all, ask again
            return None

    async def ask(self, layer: int, feature: int, purpose: str, messages: list[dict], schema_name: str, schema: dict,
                  validate, max_tokens: int | None = None) -> Asked:
        return self.take(layer, feature, purpose, messages, validate) or await super().ask(
            layer, feature, purpose, messages, schema_name, schema, validate, max_tokens)
