"""classify / autointerp end to end: a real store, a real OpenAI-speaking server on 127.0.0.1, the real client."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

import featurestore as fs
from featurestore.interp import EvidenceSettings, JudgeSettings, autointerp, classify
from featurestore.interp.queries import requests as decoded_requests
from featurestore.interp.sampling import select_features
from featurestore.interp.tables import read_rows
from openai_stub import AutoJudge, OpenAIStub, Reply, error_reply, feature_of, request_kind

EVIDENCE = EvidenceSettings(before=6, after=3, n_top=6, n_lower=3, n_test_top=4, n_test_lower=4, top_pool=20)
SPAN = EVIDENCE.before + EVIDENCE.after
GOOD = AutoJudge()


@pytest.fixture(scope="module")
def judge_store_dir(tmp_path_factory):
    """A tiny store with sparse-ish features (so all-zero windows exist), collected once for this module."""
    from conftest import build_tiny_model, build_tokenizer, make_rows, write_jsonl

    root = tmp_path_factory.mktemp("judge")
    rows = make_rows(40, seed=3)
    data = write_jsonl(root / "data.jsonl", rows)
    tokenizer = build_tokenizer(root / "tok", [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"]
                                               for r in rows])
    model = build_tiny_model(root / "model", tokenizer, enc_bias=-2.5)
    fs.collect(str(model), str(data), root / "store", chunk_size=16, batch_tokens=2048, progress=False)
    return root / "store"


@pytest.fixture
def store(judge_store_dir, tmp_path):
    shutil.copytree(judge_store_dir, tmp_path / "store")
    return fs.open(tmp_path / "store")


def judge(stub: OpenAIStub, **overrides) -> JudgeSettings:
    values = dict(model="judge-model", base_url=stub.base_url, concurrency=4, timeout_s=10.0, backoff_base_s=0.01,
                  backoff_max_s=0.05)
    return JudgeSettings(**{**values, **overrides})


class PerFeature:
    """Scripted replies per (layer, feature) of classify prompts; counts requests per feature."""

    def __init__(self, scripts: dict):
        self.scripts, self.counts, self.lock = scripts, Counter(), threading.Lock()

    def __call__(self, body, n):
        key = feature_of(body)
        with self.lock:
            i = self.counts[key]
            self.counts[key] += 1
        script = self.scripts.get(key, [])
        if callable(script):
            return script(body, i)
        return script[i] if i < len(script) else GOOD(body, n)


def test_classify_retries_errors_resume_and_sql(store):
    selected = select_features(store, "transcoder", n_per_layer=3, seed=42, min_freq=1e-7, min_examples=5)
    assert len(selected) == 9
    malformed, banana, limited, crashed = selected[:4]
    bad = json.dumps({**GOOD.classify({}), "category": "banana"})
    script = PerFeature({
        malformed: [Reply(content='{"category": "reason')],
        banana: lambda body, i: Reply(content=bad),
        limited: [error_reply(429, "Rate limit", headers={"Retry-After": "0.2"})],
        crashed: [error_reply(500, "boom", type_="server_error")],
    })
    with OpenAIStub(script) as stub:
        result = classify(store, judge(stub), n_per_layer=3, evidence=EVIDENCE, progress=False, api_key="k")
        assert result.counts == {"ok": 8, "error": 1} and result.n_requests == len(stub.requests) == 9 + 1 + 2 + 1 + 1
        rows = {(r[0], r[1]): r[2:] for r in store.sql(
            "SELECT layer, feature, status, error, n_requests, category, prompt_tokens FROM classifications").fetchall()}
        assert rows[banana][:2] == ("error", "invalid answer after 3 tries: category 'banana' is not one of "
                                             "language, domain, reasoning, uninterpretable")
        assert [rows[k][2] for k in (malformed, banana, limited, crashed)] == [2, 3, 2, 2]
        assert rows[malformed][4] == 200  # tokens of both attempts are accounted
        assert store.sql("SELECT category, count(*) FROM classifications GROUP BY ALL ORDER BY ALL").fetchall() == \
            [("reasoning", 8), (None, 1)]
        joined = store.sql("""SELECT c.layer, c.feature, any_value(f.activation_count), count(a.act)
                              FROM classifications c JOIN features f USING (source, layer, feature)
                              JOIN activations a USING (source, layer, feature) GROUP BY ALL""").fetchall()
        assert len(joined) == 9 and all(count == n for _, _, count, n in joined)

        # the audit log holds exactly what was sent, compressed
        log = decoded_requests(store, result.run_id, *malformed)
        sent = [b for b in stub.bodies() if feature_of(b) == malformed]
        assert [r["request"]["messages"] for r in log] == [b["messages"] for b in sent]
        assert [r["outcome"] for r in log] == ["invalid", "ok"]
        prompt = sent[0]["messages"][1]["content"]
        assert len(re.findall(r"^Example \d+ \(act \d+\.\d\d", prompt, re.M)) == EVIDENCE.n_top + EVIDENCE.n_lower
        assert prompt.count("<<<") == EVIDENCE.n_top + EVIDENCE.n_lower + 1  # one mark per example, one in the legend
        for piece in ("quantile", "promotes:", "suppresses:", "by domain:", "by region:", "Other active tokens:"):
            assert piece in prompt

        # resume: finished features are not asked again; the error row is retried
        before = len(stub.requests)
        again = classify(store, judge(stub), n_per_layer=3, evidence=EVIDENCE, progress=False, api_key="k")
        assert again.run_id == result.run_id and again.resumed and again.n_already_done == 8
        assert {feature_of(b) for b in stub.bodies()[before:]} == {banana}
        assert store.sql("SELECT count(*) FROM classifications").fetchall() == [(9,)]  # latest row per feature

        # --rerun: a new run, everything asked again
        before = len(stub.requests)
        fresh = classify(store, judge(stub), n_per_layer=3, evidence=EVIDENCE, progress=False, api_key="k", rerun=True)
        assert fresh.run_id != result.run_id and len(stub.requests) - before == 9 + 2
    runs = store.sql("SELECT DISTINCT run_id FROM classifications").fetchall()
    assert len(runs) == 2


KILL_SCRIPT = """
import sys
import featurestore as fs
from featurestore.interp import EvidenceSettings, JudgeSettings, classify
classify(fs.open(sys.argv[1]), JudgeSettings(model="judge-model", base_url=sys.argv[2], concurrency=2),
         n_per_layer=4, evidence=EvidenceSettings(before=6, after=3, n_top=6, n_lower=3), flush_rows=1,
         progress=False, api_key="k", run_id="killed-run")
"""


def test_killed_run_resumes_without_paying_twice(store):
    state = {"hang": True, "answered": set()}
    lock = threading.Lock()

    def respond(body, n):
        key = feature_of(body)
        with lock:
            fast = key in state["answered"] or len(state["answered"]) < 3
            if fast:
                state["answered"].add(key)
        while not fast and state["hang"]:
            time.sleep(0.05)
        return GOOD(body, n)

    with OpenAIStub(respond) as stub:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store.path), stub.base_url])
        try:
            deadline = time.monotonic() + 120
            while len(read_rows(store.path, "classifications", "killed-run")) < 3:
                assert proc.poll() is None, "the judge run ended before it was killed"
                assert time.monotonic() < deadline, "no results were written"
                time.sleep(0.1)
        finally:
            proc.kill()
            proc.wait()
        finished = {(r["layer"], r["feature"]) for r in read_rows(store.path, "classifications", "killed-run")
                    if r["status"] == "ok"}
        assert len(finished) >= 3
        state["hang"] = False
        resumed = classify(store, judge(stub, concurrency=2), n_per_layer=4,
                           evidence=EvidenceSettings(before=6, after=3, n_top=6, n_lower=3), progress=False,
                           api_key="k", run_id="killed-run")
        per_feature = Counter(feature_of(b) for b in stub.bodies())
    assert resumed.resumed and resumed.n_already_done == len(finished)
    assert all(per_feature[key] == 1 for key in finished)  # never paid twice
    final = store.sql("SELECT layer, feature, status FROM classifications WHERE run_id = 'killed-run'").fetchall()
    assert len(final) == 12 and {s for _, _, s in final} == {"ok"}
    assert set(per_feature) == {(l, f) for l, f, _ in final}


def detect_pattern(item: int) -> bool:
    return item % 3 != 0


class ScriptedDetector(AutoJudge):
    def detect(self, body, n_items):
        return [detect_pattern(i + 1) for i in range(n_items)]


EXCERPT = re.compile(r'^Excerpt (\d+):\n"""(.*?)"""$', re.S | re.M)


def readable_window(store, seq: int, lo: int, hi: int) -> str:
    """The window's text as people read it: split characters merged, decoded with 3 tokens of context each side."""
    from featurestore.text import merge_partial_bytes

    rows = store.sql("SELECT t.pos, t.token, CASE WHEN v.partial_utf8 THEN v.raw END FROM tokens t JOIN vocab v "
                     "USING (token_id) WHERE seq_id = ? AND pos BETWEEN ? AND ? ORDER BY pos",
                     params=[seq, lo - 3, hi + 3]).fetchall()
    merged = merge_partial_bytes([r[2] for r in rows], [r[1] for r in rows])
    return "".join(text for (pos, _, _), text in zip(rows, merged) if lo <= pos <= hi)


def test_autointerp_scores_honestly(store):
    with OpenAIStub(ScriptedDetector()) as stub:
        result = autointerp(store, judge(stub), n_per_layer=3, evidence=EVIDENCE, progress=False, api_key="k")
        bodies = stub.bodies()
        again = autointerp(store, judge(stub), n_per_layer=3, evidence=EVIDENCE, progress=False, api_key="k")
        assert len(stub.requests) == len(bodies) and again.resumed and again.n_already_done == 9  # nothing left to ask
    rid = result.run_id
    assert result.counts == {"ok": 9}
    assert Counter(request_kind(b) for b in bodies) == {"explain": 9, "detect": 9 * 4}
    assert "control top" in result.report

    scores = store.sql("SELECT * FROM detection_scores WHERE run_id = ?", params=[rid]).pl().to_dicts()
    assert len(scores) == 9 * 4 and {r["status"] for r in scores} == {"ok"}
    for row in scores:
        items = store.sql("""SELECT e.item, e.label, e.prediction, e.seq_id, e.pos, e.window_start, e.window_end,
                                    (SELECT count(*) FROM activations a WHERE a.source = e.source AND a.layer = e.layer
                                     AND a.feature = e.feature AND a.seq_id = e.seq_id AND a.pos = e.pos) AS fires_at_pos,
                                    (SELECT count(*) FROM activations a WHERE a.source = e.source AND a.layer = e.layer
                                     AND a.feature = e.feature AND a.seq_id = e.seq_id
                                     AND a.pos BETWEEN e.window_start AND e.window_end) AS fires_in_window
                             FROM detection_examples e WHERE run_id = ? AND layer = ? AND feature = ? AND condition = ?
                             AND control = ? ORDER BY item""",
                          params=[rid, row["layer"], row["feature"], row["condition"], row["control"]]).fetchall()
        labels = [bool(fires) for _, _, _, _, _, _, _, fires, _ in items]  # truth from the store itself
        preds = [detect_pattern(item) for item, *_ in items]
        assert [i[1] for i in items] == labels and [i[2] for i in items] == preds
        for *_, fires_at_pos, fires_in_window in items:
            assert fires_at_pos or fires_in_window == 0  # every negative window is all zeros in the store
        tp = sum(l and p for l, p in zip(labels, preds))
        fp = sum(p and not l for l, p in zip(labels, preds))
        tn = sum(not l and not p for l, p in zip(labels, preds))
        fn = sum(l and not p for l, p in zip(labels, preds))
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["n_positives"] == tp + fn and row["n_negatives"] == fp + tn > 0
        assert row["accuracy"] == pytest.approx((tp + tn) / len(items))
        assert row["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn)
        assert row["precision"] == pytest.approx(precision) and row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall) if tp else 0.0)
        assert (row["description_layer"], row["description_feature"]) != (row["layer"], row["feature"]) or not row["control"]

    # negatives match positives in domain, region and extent (window length and position of the anchor)
    shapes = store.sql("""SELECT e.layer, e.feature, e.condition, e.label, e.match, coalesce(s.domain, '?'), t.region,
                                 e.pos - e.window_start, e.window_end - e.pos
                          FROM detection_examples e JOIN sequences s USING (seq_id)
                          JOIN tokens t ON t.seq_id = e.seq_id AND t.pos = e.pos
                          WHERE e.run_id = ? AND NOT e.control""", params=[rid]).fetchall()
    groups: dict = {}
    for layer, feature, condition, label, match, *shape in shapes:
        groups.setdefault((layer, feature, condition), {True: Counter(), False: Counter(), "match": set()})
        groups[layer, feature, condition][label][tuple(shape)] += 1
        if not label:
            groups[layer, feature, condition]["match"].add(match)
    for group in groups.values():
        if group["match"] == {"domain+region"}:
            assert group[True] == group[False]
    assert sum(g["match"] == {"domain+region"} for g in groups.values()) >= len(groups) // 2

    # explanation and test splits never share a window
    for layer, feature, examples in store.sql(
            "SELECT layer, feature, explain_examples FROM explanations WHERE run_id = ?", params=[rid]).fetchall():
        shown = [(e["seq_id"], e["pos"]) for e in examples]
        held = store.sql("SELECT seq_id, pos FROM detection_examples WHERE run_id = ? AND layer = ? AND feature = ? "
                         "AND label AND NOT control", params=[rid, layer, feature]).fetchall()
        assert len(shown) == EVIDENCE.n_top + EVIDENCE.n_lower and len(held) == EVIDENCE.n_test_top + EVIDENCE.n_test_lower
        assert not any(s == h[0] and abs(p - h[1]) <= SPAN for s, p in shown for h in held)

    # every excerpt is rendered from the store's tokens the same way, and no base rate is given
    checked = 0
    for entry in decoded_requests(store, rid):
        if not entry["purpose"].startswith(("detect:", "control:")):
            continue
        user = entry["request"]["messages"][1]["content"]
        assert "exactly" not in user.lower()
        condition = entry["purpose"].split(":")[1]
        windows = store.sql("SELECT item, seq_id, window_start, window_end FROM detection_examples WHERE run_id = ? "
                            "AND layer = ? AND feature = ? AND condition = ? AND control = ? ORDER BY item",
                            params=[rid, entry["layer"], entry["feature"], condition,
                                    entry["purpose"].startswith("control")]).fetchall()
        shown = [text for _, text in EXCERPT.findall(user)]
        expected = [readable_window(store, seq, lo, hi) for _, seq, lo, hi in windows]
        assert shown == expected
        checked += 1
    assert checked == 9 * 4

    # controls score the same excerpts with another feature's description
    descriptions = {(l, f): d for l, f, d in store.descriptions().iter_rows()}
    control_prompts = [e for e in decoded_requests(store, rid) if e["purpose"] == "control:top"]
    for entry in control_prompts:
        donor = store.sql("SELECT description_layer, description_feature FROM detection_scores WHERE run_id = ? AND "
                          "layer = ? AND feature = ? AND control AND condition = 'top'",
                          params=[rid, entry["layer"], entry["feature"]]).fetchall()[0]
        assert donor != (entry["layer"], entry["feature"])
        assert f"Description of the feature: {descriptions[donor]}\n" in entry["request"]["messages"][1]["content"]

    # the same run cannot be continued with other settings
    with pytest.raises(fs.UserError, match="other settings"):
        autointerp(store, JudgeSettings(model="other-model", base_url="http://127.0.0.1:9/v1"), n_per_layer=3,
                   evidence=EVIDENCE, progress=False, api_key="k", run_id=rid)


def test_autointerp_explain_failure_is_an_error_row_and_detection_waits(store):
    def respond(body, n):
        if request_kind(body) == "explain" and feature_of(body) == target:
            return Reply(content='{"reasoning": "x", "description": "too short"}')
        return GOOD(body, n)

    target = select_features(store, "transcoder", n_per_layer=2, seed=42, min_examples=18)[0]
    with OpenAIStub(respond) as stub:
        result = autointerp(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, progress=False, api_key="k")
    assert result.counts == {"ok": 5, "error": 1}
    error = store.sql("SELECT status, error, n_requests FROM explanations WHERE layer = ? AND feature = ?",
                      params=list(target)).fetchall()
    assert error == [("error", "invalid answer after 3 tries: description has 2 words, not 10-15", 3)]
    assert store.sql("SELECT count(*) FROM detection_scores WHERE layer = ? AND feature = ?",
                     params=list(target)).fetchall() == [(0,)]


def test_dry_run_calls_nothing(store, capsys):
    with OpenAIStub() as stub:
        plan = autointerp(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, dry_run=True, api_key="k")
        plain = classify(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, dry_run=True, api_key="k")
        assert len(stub.requests) == 0
    assert plan.n_requests == 6 * 5 and plain.n_requests == 6
    text = plan.text()
    assert text.count("===== explain L") == 2 and text.count("===== detect (top) L") == 2
    assert "30 requests would be made" in text
    assert plain.text().count("===== classify L") == 2
    assert not (store.path / "interp").exists()
    for view in ("classifications", "explanations", "detection_scores", "detection_examples", "interp_requests",
                 "interp_runs"):
        assert store.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]  # typed and empty before any run
    assert store.descriptions().columns == ["layer", "feature", "description"]


def test_exports_keep_the_original_schemas(store, tmp_path):
    from exporters.interp_json import export_autointerp, export_classifications

    with OpenAIStub(ScriptedDetector()) as stub:
        classify(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, progress=False, api_key="k")
        autointerp(store, judge(stub), n_per_layer=2, evidence=EVIDENCE, progress=False, api_key="k")
    doc = json.loads(export_classifications(store, tmp_path / "feature_classifications.json").read_text())
    assert {"input_dir", "model", "n_per_layer", "min_freq", "seed", "n_classified"} <= set(doc["metadata"])
    assert doc["metadata"]["n_classified"] == 6 and doc["metadata"]["model"] == "judge-model"
    first = doc["features"][0]
    assert set(first) == {"layer", "feature", "cantor_id", "category", "confidence", "mechanism", "domain_type",
                          "category_description", "mechanism_description", "input_pattern", "output_pattern",
                          "llm_reasoning", "n_examples", "activation_freq", "top_logits", "n_examples_shown"}
    assert first["cantor_id"] == fs.cantor(first["layer"], first["feature"]) and len(first["top_logits"]) == 10

    doc = json.loads(export_autointerp(store, tmp_path / "autointerp.json").read_text())
    meta = doc["metadata"]
    assert {"input_dir", "data_path", "model", "tokenizer", "max_tokens", "n_per_layer", "min_freq", "seed",
            "n_processed", "mean_detection_top_accuracy", "mean_detection_random_accuracy"} <= set(meta)
    assert meta["n_processed"] == 6 and meta["max_tokens"] == SPAN + 1
    row = doc["features"][0]
    for key in ("layer", "feature", "cantor_id", "description", "reasoning", "detection_top_accuracy",
                "detection_top_precision", "detection_top_recall", "detection_random_accuracy",
                "detection_random_precision", "detection_random_recall", "n_examples", "activation_freq",
                "detection_top_balanced_accuracy", "detection_top_f1", "control_top_accuracy"):
        assert key in row
    means = store.sql("SELECT avg(accuracy) FROM detection_scores WHERE condition = 'top' AND NOT control").fetchall()
    assert meta["mean_detection_top_accuracy"] == pytest.approx(means[0][0])


def test_cli_classify_and_export(store, tmp_path, monkeypatch, capsys):
    import click
    from click.testing import CliRunner

    from cli.judge_commands import register_export
    from cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli")
    with OpenAIStub() as stub:
        code = main(["classify", str(store.path), "--base-url", stub.base_url, "--model", "judge-model",
                     "--n-per-layer", "1", "--before", "6", "--after", "3", "--concurrency", "2"])
        assert code == 0 and len(stub.requests) == 3
    out = capsys.readouterr().out
    assert "3 features selected" in out and "ok 3" in out and "categories this invocation: reasoning 3" in out

    @click.group()
    def export():
        pass

    register_export(export)
    target = tmp_path / "fc.json"
    result = CliRunner().invoke(export, ["classifications", str(store.path), "--out", str(target)])
    assert result.exit_code == 0, result.output
    assert len(json.loads(target.read_text())["features"]) == 3
    assert main(["classify", str(store.path), "--features", "0:9999", "--base-url", "http://127.0.0.1:9/v1"]) == 2
