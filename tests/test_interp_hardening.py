"""Judges that always end, secrets that stay secret, exit codes that tell, readable evidence, one row per run.

Real store (tiny model collected here), real OpenAI-speaking server on 127.0.0.1, the real openai client.
"""
from __future__ import annotations

import asyncio
import json
import random
import shutil

import pytest

import featurestore as fs
from featurestore.interp import EvidenceSettings, JudgeSettings, autointerp, classify
from featurestore.interp.answers import CLASSIFICATION_SCHEMA
from featurestore.interp.client import JudgeClient, RequestFailed
from featurestore.interp.evidence import EvidenceBuilder
from featurestore.interp.prompts import marked_text, other_active
from featurestore.interp.queries import requests as decoded_requests
from featurestore.interp.redact import Redactor
from featurestore.features import Example
from openai_stub import AutoJudge, OpenAIStub, Reply, error_reply, feature_of, request_kind

EVIDENCE = EvidenceSettings(before=6, after=3, n_top=4, n_lower=2, n_test_top=3, n_test_lower=3, top_pool=12)
GOOD = AutoJudge()
KEY = "sk-live-Zq8XyV3mN5pR7tW9"
MESSAGES = [{"role": "user", "content": "Classify feature L1F2 (transcoder, layer 1)."}]
OMEGA = "Ω"  # two bytes in UTF-8, never seen when the tokenizer was trained: split across two byte-level tokens


@pytest.fixture(scope="module")
def hard_store_dir(tmp_path_factory):
    from conftest import WORDS, build_tiny_model, build_tokenizer, make_rows, write_jsonl

    root = tmp_path_factory.mktemp("hard")
    train = make_rows(20, seed=5)
    tokenizer = build_tokenizer(root / "tok", [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"]
                                               for r in train])
    rng = random.Random(7)
    rows = []
    for i in range(16):
        words = " ".join(rng.choice(WORDS[:40]) for _ in range(rng.randint(8, 20)))
        rows.append({"domain": ("math", "code", "science")[i % 3], "source": "synthetic",
                     "conversations": [{"from": "user", "value": f"A 40 {OMEGA} resistor {words}"},
                                       {"from": "assistant", "value": f"<think>\n{words} {OMEGA} so {OMEGA}\n</think>\n\n{OMEGA}"}]})
    data = write_jsonl(root / "data.jsonl", rows)
    model = build_tiny_model(root / "model", tokenizer, enc_bias=-0.6)
    fs.collect(str(model), str(data), root / "store", chunk_size=8, batch_tokens=2048, progress=False)
    return root / "store"


@pytest.fixture
def store(hard_store_dir, tmp_path):
    shutil.copytree(hard_store_dir, tmp_path / "store")
    return fs.open(tmp_path / "store")


def judge(stub: OpenAIStub, **overrides) -> JudgeSettings:
    values = dict(model="judge-model", base_url=stub.base_url, concurrency=4, timeout_s=10.0, backoff_base_s=0.01,
                  backoff_max_s=0.05, transport_retries=2)
    return JudgeSettings(**{**values, **overrides})


def complete(stub: OpenAIStub, settings: JudgeSettings):
    async def go():
        client = JudgeClient(settings, api_key=KEY)
        try:
            return client, await client.complete(MESSAGES, "feature_classification", CLASSIFICATION_SCHEMA)
        finally:
            await client.close()
    return asyncio.run(go())


# ---- 1. deadlines

def test_trickling_server_is_cut_at_the_whole_request_deadline():
    """One byte every 0.2 s never trips the HTTP client's gap timeout; the request deadline of 1 s does."""
    trickle = Reply(content=json.dumps(GOOD.classify({})), trickle_s=0.2)
    with OpenAIStub(lambda body, n: trickle) as stub:
        with pytest.raises(RequestFailed) as info:
            complete(stub, judge(stub, timeout_s=1.0, transport_retries=1))
        assert len(stub.requests) == 2
    assert [a.outcome for a in info.value.attempts] == ["retry", "failed"]
    assert all(a.http_status is None and a.error == "timeout: no complete answer within 1s" for a in info.value.attempts)
    assert "gave up after 2 requests" in str(info.value)


def test_classify_records_an_error_row_when_every_request_trickles(store):
    trickle = Reply(content=json.dumps(GOOD.classify({})), trickle_s=0.2)
    with OpenAIStub(lambda body, n: trickle) as stub:
        result = classify(store, judge(stub, timeout_s=0.6, transport_retries=0), n_per_layer=1, evidence=EVIDENCE,
                          progress=False, api_key=KEY)
    assert result.counts == {"error": 3} and result.n_failed == 3
    rows = store.sql("SELECT status, error, n_requests FROM classifications").fetchall()
    assert rows == [("error", "request failed: gave up after 1 requests: timeout: no complete answer within 0.6s", 1)] * 3


def test_retry_after_of_a_day_ends_the_question_at_once():
    day = error_reply(429, "Daily quota exhausted", headers={"Retry-After": "86400"})
    with OpenAIStub(lambda body, n: day) as stub:
        with pytest.raises(RequestFailed) as info:
            complete(stub, judge(stub, max_wait_s=30.0, transport_retries=6))
        assert len(stub.requests) == 1
    assert str(info.value) == ("gave up after 1 requests (endpoint asked to retry after 86400s, more than the 30s wait "
                               "cap): HTTP 429: Daily quota exhausted")


def test_retry_after_within_the_cap_is_obeyed():
    short = error_reply(429, "slow down", headers={"Retry-After": "0.3"})
    with OpenAIStub(lambda body, n: short if n == 0 else GOOD(body, n)) as stub:
        client, result = complete(stub, judge(stub, max_wait_s=1.0))
    assert [a.http_status for a in result.attempts] == [429, 200]
    assert client.waits.n_waits == 1 and client.waits.waited_s == pytest.approx(0.3)


def test_backoff_is_capped_by_max_wait_and_the_budget_ends_the_question():
    down = error_reply(503, "overloaded", type_="server_error")
    with OpenAIStub(lambda body, n: down) as stub:
        async def go(settings):
            client = JudgeClient(settings, api_key=KEY)
            try:
                with pytest.raises(RequestFailed) as info:
                    await client.complete(MESSAGES, "feature_classification", CLASSIFICATION_SCHEMA)
                return client, info.value
            finally:
                await client.close()

        # a 10 s backoff base would wait 5-10 s; the 0.05 s cap holds every wait
        client, failed = asyncio.run(go(judge(stub, backoff_base_s=10.0, backoff_max_s=60.0, max_wait_s=0.05,
                                              transport_retries=3)))
        assert client.waits.n_waits == 3 and client.waits.waited_s <= 3 * 0.05
        assert len(failed.attempts) == 4
        # waits of 0.1, 0.2, 0.4 ... s cross a 0.25 s budget long before 20 retries
        client, failed = asyncio.run(go(judge(stub, backoff_base_s=0.2, backoff_max_s=60.0, max_wait_s=60.0,
                                              transport_retries=20, budget_s=0.25)))
    assert "question budget of 0.25s spent" in str(failed) and len(failed.attempts) <= 3
    assert failed.attempts[-1].outcome == "failed"


def test_waits_and_failures_show_in_the_progress_line(store, capsys):
    slow = error_reply(429, "slow down", headers={"Retry-After": "0.5"})
    with OpenAIStub(lambda body, n: slow if n == 0 else error_reply(400, "bad request")) as stub:
        classify(store, judge(stub, concurrency=1), n_per_layer=1, evidence=EVIDENCE, progress=True, api_key=KEY)
    err = capsys.readouterr().err
    assert "1 waiting to retry (up to 0s: Retry-After)" in err or "1 waiting to retry (up to 1s: Retry-After)" in err
    assert "3 failed" in err


# ---- 2. secrets

def test_redactor_masks_the_key_and_key_shaped_strings():
    redact = Redactor([KEY, "EMPTY"])
    assert redact(f"bad key {KEY}!") == "bad key ***!"
    assert redact("Authorization: Bearer abcdefgh12345678") == "Authorization: Bearer ***"
    assert redact("other key sk-proj-AAAAbbbbCCCC1234 here") == "other key *** here"
    assert redact('{"api_key": "0123456789abcdef"}') == '{"api_key": "***"}'
    assert redact("https://user:hunter2secret@proxy.example/v1") == "https://user:***@proxy.example/v1"
    assert redact("EMPTY is not a secret; neither is task-1234567890") == "EMPTY is not a secret; neither is task-1234567890"
    assert redact.deep({"a": [KEY, 3, {"b": KEY}]}) == {"a": ["***", 3, {"b": "***"}]}


def test_an_endpoint_echoing_the_key_never_puts_it_in_the_store_or_exports(store, tmp_path, monkeypatch, capsys):
    from cli.main import main
    from exporters.interp_json import export_classifications

    def echo(body, n):
        auth = stub.requests[n]["headers"]["authorization"]  # "Bearer <key>"
        key = auth.split()[-1]
        target = feature_of(body)
        if target == first:
            return error_reply(500, f"upstream rejected {auth} (key {key})", type_="server_error")
        answer = {**GOOD.classify(body), "reasoning": f"the request was signed with {key}"}
        return Reply(content=json.dumps(answer))

    first = None
    with OpenAIStub(echo) as stub:
        plan = classify(store, judge(stub), n_per_layer=1, evidence=EVIDENCE, dry_run=True, api_key=KEY)
        first = feature_of({"messages": plan.prompts[0][1]})
        result = classify(store, judge(stub), n_per_layer=1, evidence=EVIDENCE, progress=False, api_key=KEY)
        assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in stub.requests)  # the key was sent
    assert result.counts == {"error": 1, "ok": 2}
    error = store.sql("SELECT error FROM classifications WHERE status = 'error'").fetchall()[0][0]
    assert error.startswith("request failed: gave up after 3 requests: HTTP 500: upstream rejected Bearer *** (key ***)")
    reasons = [r[0] for r in store.sql("SELECT reasoning FROM classifications WHERE status = 'ok'").fetchall()]
    assert reasons == ["the request was signed with ***"] * 2
    everything = []
    for row in decoded_requests(store, result.run_id):
        everything += [str(v) for v in row.values()]
    for view in ("classifications", "interp_requests", "interp_runs", "interp_invocations"):
        everything += [str(v) for row in store.sql(f"SELECT * FROM {view}").fetchall() for v in row]
    text = "\n".join(everything)
    assert "***" in text and KEY not in text and KEY[3:] not in text
    exported = export_classifications(store, tmp_path / "fc.json").read_text()
    assert "signed with ***" in exported and KEY not in exported
    capsys.readouterr()
    assert main(["sql", str(store.path), "SELECT error, reasoning FROM classifications"]) == 0
    printed = capsys.readouterr().out
    assert "***" in printed and KEY not in printed


def test_a_404_naming_the_key_stops_the_run_without_printing_it(store, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with OpenAIStub(lambda body, n: error_reply(404, f"model not found for key {KEY}")) as stub:
        code = main(["classify", str(store.path), "--base-url", stub.base_url, "--model", "judge-model",
                     "--n-per-layer", "1", "--before", "6", "--after", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "model not found for key ***" in err and KEY not in err


# ---- 3. exit codes

def test_cli_exits_1_with_the_error_count_last_when_features_fail(store, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    args = ["classify", str(store.path), "--model", "judge-model", "--n-per-layer", "1", "--before", "6",
            "--after", "3", "--max-wait", "0.01"]
    with OpenAIStub(lambda body, n: error_reply(500, "boom", type_="server_error")) as stub:
        code = main(args + ["--base-url", stub.base_url])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert lines[-1] == "3 of 3 features ended in error (status=error rows); rerun the same command to retry them"
    assert "error 3" in lines[0]
    with OpenAIStub() as stub:  # resumed: the three are retried and succeed
        code = main(args + ["--base-url", stub.base_url])
    out = capsys.readouterr().out
    assert code == 0 and "ok 3" in out and "ended in error" not in out


def test_autointerp_counts_features_whose_explanation_or_detection_failed(store):
    targets = []

    def respond(body, n):
        kind = request_kind(body)
        if kind == "explain" and feature_of(body) == targets[0]:
            return Reply(content='{"reasoning": "x", "description": "too short"}')
        return GOOD(body, n)

    from featurestore.interp.sampling import select_features

    targets.append(select_features(store, "transcoder", n_per_layer=1, seed=42, min_examples=16)[0])
    with OpenAIStub(respond) as stub:
        result = autointerp(store, judge(stub), n_per_layer=1, evidence=EVIDENCE, progress=False, api_key=KEY,
                            control=False)
    assert result.counts == {"ok": 2, "error": 1} and result.n_failed == 1


# ---- 4. readable evidence

def test_windows_merge_characters_split_across_tokens(store):
    omega_ids = [r[0] for r in store.sql("SELECT token_id FROM vocab WHERE partial_utf8").fetchall()]
    seq_id, pos = store.sql("SELECT seq_id, pos FROM tokens WHERE token = '\\xce' ORDER BY seq_id, pos LIMIT 1").fetchall()[0]
    assert omega_ids  # the tokenizer really splits Ω into byte tokens
    builder = EvidenceBuilder(store, "transcoder", EVIDENCE, seed=0)
    try:
        feature = store.sql("SELECT feature FROM features WHERE layer = 0 ORDER BY activation_count DESC LIMIT 1").fetchall()[0][0]
        example, cut_after, cut_before = builder.windows(0, [(feature, seq_id, pos, 2, 2), (feature, seq_id, pos, 2, 0),
                                                             (feature, seq_id, pos + 1, 0, 2)])
    finally:
        builder.close()
    raw = [r[0] for r in store.sql("SELECT token FROM tokens WHERE seq_id = ? AND pos BETWEEN ? AND ? ORDER BY pos",
                                   params=[seq_id, pos - 2, pos + 2]).fetchall()]
    assert raw[2:4] == ["\\xce", "\\xa9"]  # what the vocab shows per token
    assert example.tokens[2:4] == ["", OMEGA] and example.tokens[:2] == raw[:2] and example.tokens[4:] == raw[4:]
    assert len(example.token_ids) == len(example.tokens) == 5
    # a window ending inside the character leaves it out; one starting inside it shows it whole
    assert cut_after.tokens == raw[:2] + [""] and cut_before.tokens[:2] == [OMEGA, raw[4]]


def test_judges_read_the_character_not_its_bytes(store):
    with OpenAIStub() as stub:
        classify(store, judge(stub), n_per_layer=3, evidence=EvidenceSettings(before=6, after=3, n_top=10, n_lower=5),
                 progress=False, api_key=KEY)
        prompts = [m["content"] for body in stub.bodies() for m in body["messages"] if m["role"] == "user"]
    examples = "\n".join(p.split("Top-activating examples", 1)[1] for p in prompts)
    assert OMEGA in examples
    assert "\\xce" not in examples and "\\xa9" not in examples


def test_the_mark_covers_the_whole_character():
    example = Example(seq_id=0, pos=1, act=2.0, token_ids=[1, 2, 3, 4], tokens=["A 40 ", "", OMEGA, " ok"],
                      acts=[0.0, 2.0, 1.0, 0.5], train_token_ind=1, domain="", region="")
    assert marked_text(example) == "A 40 <<<Ω>>> ok"
    assert other_active(example) == '"Ω" 1.00, " ok" 0.50'


# ---- 5. interp_runs

def test_interp_runs_has_one_row_per_run_with_invocations_counted(store):
    with OpenAIStub() as stub:
        first = classify(store, judge(stub), n_per_layer=1, evidence=EVIDENCE, progress=False, api_key=KEY)
        again = classify(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, progress=False, api_key=KEY)
        other = classify(store, judge(stub), n_per_layer=1, evidence=EVIDENCE, progress=False, api_key=KEY, rerun=True)
    assert again.run_id == first.run_id and again.resumed and other.run_id != first.run_id
    rows = store.sql("SELECT run_id, invocations, started_at < last_started_at, settings FROM interp_runs "
                     "ORDER BY started_at").fetchall()
    assert [(r[0], r[1], r[2]) for r in rows] == [(first.run_id, 2, True), (other.run_id, 1, False)]
    assert json.loads(rows[0][3])["n_per_layer"] == 2  # the latest invocation's settings
    assert store.sql("SELECT count(*) FROM interp_invocations").fetchall() == [(3,)]
