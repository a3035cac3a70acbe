"""The judge client against a real OpenAI-speaking HTTP server on 127.0.0.1, driven by the real openai client."""
from __future__ import annotations

import asyncio
import json

import pytest

from featurestore.errors import UserError
from featurestore.interp.answers import (CLASSIFICATION_SCHEMA, EXPLANATION_SCHEMA, validate_classification)
from featurestore.interp.client import (FatalJudgeError, JudgeClient, JudgeSettings, RequestFailed, read_dotenv_key,
                                        resolve_api_key, retry_after_seconds)
from featurestore.interp.runner import JudgeRun
from featurestore.interp.tables import InterpWriter, decompress_text, read_rows
from openai_stub import AutoJudge, OpenAIStub, Reply, error_reply

MESSAGES = [{"role": "system", "content": "judge"}, {"role": "user", "content": "Classify feature L1F2 (transcoder, layer 1)."}]
GOOD = AutoJudge()


def settings(stub: OpenAIStub, **overrides) -> JudgeSettings:
    values = dict(model="judge-model", base_url=stub.base_url, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.05,
                  transport_retries=3, concurrency=4)
    values.update(overrides)
    return JudgeSettings(**values)


def complete(stub: OpenAIStub, judge: JudgeSettings, calls: int = 1):
    async def go():
        client = JudgeClient(judge, api_key="sk-test")
        try:
            return [await client.complete(MESSAGES, "feature_classification", CLASSIFICATION_SCHEMA) for _ in range(calls)]
        finally:
            await client.close()
    return asyncio.run(go())


def scripted(*replies):
    """Replies in order for the first requests, then valid answers."""
    def respond(body, n):
        return replies[n] if n < len(replies) else GOOD(body, n)
    return respond


def test_valid_answer_uses_structured_outputs_and_validates():
    with OpenAIStub() as stub:
        [result] = complete(stub, settings(stub))
        body = stub.bodies()[0]
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == CLASSIFICATION_SCHEMA
    assert body["response_format"]["json_schema"]["strict"] is True
    assert body["max_tokens"] == 4096 and "max_completion_tokens" not in body
    assert validate_classification(result.text)["mechanism"] == "input_simple"
    assert [a.http_status for a in result.attempts] == [200]
    assert (result.attempts[0].prompt_tokens, result.attempts[0].completion_tokens) == (100, 20)


def test_429_waits_for_retry_after_then_succeeds():
    with OpenAIStub(scripted(error_reply(429, "Rate limit reached", headers={"Retry-After": "0.4"}))) as stub:
        [result] = complete(stub, settings(stub))
        first, second = stub.requests
    assert [a.http_status for a in result.attempts] == [429, 200]
    assert "Rate limit reached" in result.attempts[0].error
    assert second["at"] - first["at"] >= 0.4  # the server's Retry-After, not the 0.01 s backoff


def test_retry_after_forms():
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({"retry-after": "99999"}) == 99999.0  # as said; the client caps its waits
    assert retry_after_seconds({"retry-after": "nan"}) is None and retry_after_seconds({"retry-after": "inf"}) == float("inf")
    assert retry_after_seconds({}) is None


def test_5xx_are_retried_then_succeed():
    replies = (error_reply(500, "boom", type_="server_error"), error_reply(502, "bad gateway", type_="server_error"))
    with OpenAIStub(scripted(*replies)) as stub:
        [result] = complete(stub, settings(stub))
        assert len(stub.requests) == 3
    assert [a.http_status for a in result.attempts] == [500, 502, 200]
    assert [a.outcome for a in result.attempts] == ["retry", "retry", "ok"]


def test_slow_response_past_timeout_is_retried():
    with OpenAIStub(scripted(Reply(content="{}", delay_s=3.0))) as stub:
        [result] = complete(stub, settings(stub, timeout_s=0.5))
        assert len(stub.requests) == 2
    assert result.attempts[0].http_status is None and "timeout" in result.attempts[0].error
    assert result.attempts[1].http_status == 200


def test_gives_up_after_transport_retries():
    with OpenAIStub(lambda body, n: error_reply(503, "overloaded", type_="server_error")) as stub:
        with pytest.raises(RequestFailed) as info:
            complete(stub, settings(stub, transport_retries=2))
        assert len(stub.requests) == 3
    assert len(info.value.attempts) == 3 and info.value.attempts[-1].outcome == "failed"
    assert "overloaded" in str(info.value)


def test_reasoning_model_rejecting_max_tokens_switches_for_good():
    rejection = error_reply(400, "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                 "Use 'max_completion_tokens' instead.", param="max_tokens")
    with OpenAIStub(scripted(rejection)) as stub:
        results = complete(stub, settings(stub), calls=2)
        bodies = stub.bodies()
    assert "max_tokens" in bodies[0]
    assert [("max_tokens" in b, b.get("max_completion_tokens")) for b in bodies[1:]] == [(False, 4096), (False, 4096)]
    assert all(r.text for r in results)


def test_reasoning_model_names_start_with_max_completion_tokens():
    with OpenAIStub() as stub:
        complete(stub, settings(stub, model="gpt-5-mini"))
        assert stub.bodies()[0]["max_completion_tokens"] == 4096


def test_endpoint_without_json_schema_falls_back_to_json_object():
    rejection = error_reply(400, "response_format type json_schema is not supported by this server", param="response_format")
    with OpenAIStub(scripted(rejection)) as stub:
        [result] = complete(stub, settings(stub))
        bodies = stub.bodies()
    assert bodies[0]["response_format"]["type"] == "json_schema"
    assert bodies[1]["response_format"] == {"type": "json_object"}
    assert validate_classification(result.text)["category"] == "reasoning"


def test_bad_key_stops_the_run():
    with OpenAIStub(lambda body, n: error_reply(401, "Incorrect API key", type_="invalid_request_error")) as stub:
        with pytest.raises(FatalJudgeError):
            complete(stub, settings(stub))
        assert len(stub.requests) == 1


def test_api_key_from_dotenv_is_sent_and_never_logged(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("# comment\nOTHER=1\nexport OPENAI_API_KEY='sk-from-dotenv-123'\n")
    assert read_dotenv_key("OPENAI_API_KEY") == "sk-from-dotenv-123"
    with OpenAIStub() as stub:
        judge = settings(stub)

        async def go():
            client = JudgeClient(judge)
            writer = InterpWriter(tmp_path / "store", "r1", flush_rows=1)
            run = JudgeRun(None, client, writer, "r1", "transcoder", "v1", progress=False)
            try:
                return await run.ask(1, 2, "classify", MESSAGES, "feature_classification", CLASSIFICATION_SCHEMA,
                                     validate_classification)
            finally:
                await client.close()
                writer.close()
        asked = asyncio.run(go())
        assert stub.requests[0]["headers"].get("authorization") == "Bearer sk-from-dotenv-123"
    assert asked.error is None
    blobs = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*.parquet"))
    assert b"sk-from-dotenv" not in blobs
    [row] = read_rows(tmp_path / "store", "requests", "r1")
    assert "sk-from-dotenv" not in decompress_text(row["request_zstd"])


def test_no_key_for_openai_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="OPENAI_API_KEY"):
        resolve_api_key("https://api.openai.com/v1")
    assert resolve_api_key("http://127.0.0.1:8000/v1") == "EMPTY"


def _ask_with(responder, tmp_path, attempts=3):
    with OpenAIStub(responder) as stub:
        async def go():
            client = JudgeClient(settings(stub, answer_attempts=attempts), api_key="k")
            writer = InterpWriter(tmp_path, "r1", flush_rows=1000)
            run = JudgeRun(None, client, writer, "r1", "transcoder", "v1", progress=False)
            try:
                return await run.ask(1, 2, "classify", MESSAGES, "feature_classification", CLASSIFICATION_SCHEMA,
                                     validate_classification)
            finally:
                await client.close()
                writer.close()
        asked = asyncio.run(go())
        return asked, stub.bodies(), read_rows(tmp_path, "requests", "r1")


def test_malformed_json_is_asked_again(tmp_path):
    asked, bodies, rows = _ask_with(scripted(Reply(content='{"category": "reasoning", "confid')), tmp_path)
    assert asked.error is None and asked.value["category"] == "reasoning"
    assert asked.n_requests == 2 and len(bodies) == 2
    assert [r["outcome"] for r in rows] == ["invalid", "ok"]
    assert "not JSON" in rows[0]["error"]
    assert decompress_text(rows[0]["response_zstd"]).startswith('{"id": "chatcmpl-stub-0"')
    assert json.loads(decompress_text(rows[1]["request_zstd"]))["messages"] == MESSAGES


def test_out_of_enum_answers_end_as_error_after_attempts(tmp_path):
    bad = json.dumps({**GOOD.classify({}), "category": "banana"})
    asked, bodies, rows = _ask_with(lambda body, n: Reply(content=bad), tmp_path, attempts=3)
    assert asked.value is None
    assert asked.error == "invalid answer after 3 tries: category 'banana' is not one of language, domain, reasoning, uninterpretable"
    assert len(bodies) == 3 and asked.n_requests == 3
    assert (asked.prompt_tokens, asked.completion_tokens) == (300, 60)
    assert [r["outcome"] for r in rows] == ["invalid"] * 3 and [r["attempt"] for r in rows] == [1, 2, 3]


def test_explanation_schema_is_strict_object():
    assert EXPLANATION_SCHEMA["required"] == ["reasoning", "description"]
    assert EXPLANATION_SCHEMA["additionalProperties"] is False
