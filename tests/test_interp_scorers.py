"""Fuzzing and embedding scorers, separate explainer/scorer/embeddings models, re-scoring and resume after SIGKILL,
against a real store and a scripted OpenAI-compatible server (chat and embeddings) on 127.0.0.1."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections import Counter

import numpy as np
import pytest

import featurestore as fs
from featurestore.interp import EvidenceSettings, JudgeSettings, autointerp
from featurestore.interp.metrics import auroc, auroc_interval, balanced_accuracy_interval
from featurestore.interp.queries import requests as decoded_requests
from featurestore.interp.tables import decompress_text, read_rows
from openai_stub import AutoJudge, Embedder, OpenAIStub, Reply, request_kind
from test_interp_pipeline import judge_store_dir, store  # noqa: F401  (fixtures: one tiny store per module)

EVIDENCE = EvidenceSettings(before=6, after=3, n_top=6, n_lower=3, n_test_top=4, n_test_lower=4, top_pool=20)
EXCERPT = re.compile(r'^Excerpt (\d+):\n"""(.*?)"""$', re.S | re.M)


def settings(stub: OpenAIStub, model: str, **overrides) -> JudgeSettings:
    values = dict(model=model, base_url=stub.base_url, concurrency=4, timeout_s=10.0, backoff_base_s=0.01,
                  backoff_max_s=0.05)
    return JudgeSettings(**{**values, **overrides})


def fuzz_pattern(item: int) -> bool:
    return item % 3 != 1


class Scripted(AutoJudge):
    """Detection: item % 2 == 1; fuzzing: item % 3 != 1 (1-based items)."""

    def detect(self, body, n_items):
        return [(i + 1) % 2 == 1 for i in range(n_items)]

    def fuzz(self, body, n_items):
        return [fuzz_pattern(i + 1) for i in range(n_items)]


def vector(text: str) -> list[float]:
    """A fixed embedding: descriptions point along x; an excerpt's angle grows with its count of 's' and digits."""
    if text.startswith("fires on tokens"):
        return [1.0, 0.0]
    angle = 0.15 * (text.count("s") % 7) + 0.05 * sum(c.isdigit() for c in text)
    return [float(np.cos(angle)), float(np.sin(angle))]


def confusion(labels, preds):
    tp = sum(l and p for l, p in zip(labels, preds))
    fp = sum(p and not l for l, p in zip(labels, preds))
    tn = sum(not l and not p for l, p in zip(labels, preds))
    fn = sum(l and not p for l, p in zip(labels, preds))
    return tp, fp, tn, fn


def test_auroc_and_intervals_by_hand():
    # positives 0.9, 0.5, 0.3; negatives 0.4, 0.3, 0.1: wins 3 + 3 + (1 + a tie 0.5) = 7.5 of 9
    assert auroc([1, 1, 1, 0, 0, 0], [0.9, 0.5, 0.3, 0.4, 0.3, 0.1]) == pytest.approx(7.5 / 9)
    assert auroc([1, 1], [0.2, 0.3]) is None
    low, high = auroc_interval([1, 1, 1, 0, 0, 0], [0.9, 0.5, 0.3, 0.4, 0.3, 0.1])
    assert 0 <= low < 7.5 / 9 < high <= 1
    assert auroc_interval([1, 0], [0.9, 0.1]) == (1.0, 1.0)
    # perfect answers: no spread; 25 + 25 items at 0.8 give an interval about 0.22 wide (the --n-test default)
    assert balanced_accuracy_interval(5, 0, 5, 0) == (1.0, 1.0)
    low, high = balanced_accuracy_interval(20, 5, 20, 5)
    assert 0.18 < high - low < 0.26 and low < 0.8 < high
    low5, high5 = balanced_accuracy_interval(4, 1, 4, 1)
    assert high5 - low5 > 2 * (high - low)


def test_fuzzing_embedding_and_separate_models(store):
    with OpenAIStub(Scripted(), Embedder(vector)) as stub:
        result = autointerp(store, settings(stub, "explainer-model"), n_per_layer=2, evidence=EVIDENCE, progress=False,
                            api_key="k", scorers=("detection", "fuzzing", "embedding"),
                            scorer=settings(stub, "scorer-model"), embeddings=settings(stub, "embed-model"))
        chat, embeds = stub.bodies("chat"), stub.bodies("embeddings")
        again = autointerp(store, settings(stub, "explainer-model"), n_per_layer=2, evidence=EVIDENCE, progress=False,
                           api_key="k", scorers=("detection", "fuzzing", "embedding"),
                           scorer=settings(stub, "scorer-model"), embeddings=settings(stub, "embed-model"))
        assert again.resumed and len(stub.requests) == len(chat) + len(embeds)  # nothing asked twice
    rid = result.run_id
    assert result.counts == {"ok": 6}
    kinds = Counter((request_kind(b), b["model"]) for b in chat)
    assert kinds == {("explain", "explainer-model"): 6, ("detect", "scorer-model"): 6 * 4,
                     ("fuzz", "scorer-model"): 6 * 4}
    assert len(embeds) == 6 * 4 and {b["model"] for b in embeds} == {"embed-model"}
    assert "fuzzing" in result.report and "embedding" in result.report and "auroc" in result.report

    # the model that answered is recorded per row
    assert store.sql("SELECT DISTINCT judge_model FROM explanations").fetchall() == [("explainer-model",)]
    assert store.sql("SELECT DISTINCT judge_model FROM detection_scores").fetchall() == [("scorer-model",)]
    assert sorted(store.sql("SELECT DISTINCT scorer, judge_model FROM scorer_scores").fetchall()) == \
        [("embedding", "embed-model"), ("fuzzing", "scorer-model")]

    # fuzzing: correct marks are exactly the activating tokens in the store; wrong marks are inactive tokens
    fuzz_rows = store.sql("SELECT * FROM scorer_scores WHERE scorer = 'fuzzing' AND run_id = ?", params=[rid]).pl().to_dicts()
    assert len(fuzz_rows) == 6 * 4 and {r["status"] for r in fuzz_rows} == {"ok"}
    n_wrong = 0
    for row in fuzz_rows:
        items = store.sql("SELECT item, seq_id, window_start, window_end, label, marks, prediction FROM scorer_examples "
                          "WHERE run_id = ? AND scorer = 'fuzzing' AND layer = ? AND feature = ? AND condition = ? "
                          "AND control = ? ORDER BY item",
                          params=[rid, row["layer"], row["feature"], row["condition"], row["control"]]).fetchall()
        labels = []
        for item, seq, lo, hi, label, marks, prediction in items:
            active = {p for (p,) in store.sql(
                "SELECT pos FROM activations WHERE source = 'transcoder' AND layer = ? AND feature = ? AND seq_id = ? "
                "AND pos BETWEEN ? AND ?", params=[row["layer"], row["feature"], seq, lo, hi]).fetchall()}
            if label:
                assert set(marks) == active and active
            else:
                n_wrong += 1
                assert marks and not set(marks) & active and all(lo <= m <= hi for m in marks)
                assert len(marks) == min(len(active), hi - lo + 1 - len(active))
            assert prediction == fuzz_pattern(item)
            labels.append(label)
        tp, fp, tn, fn = confusion(labels, [fuzz_pattern(i) for i, *_ in items])
        assert (row["tp"], row["fp"], row["tn"], row["fn"]) == (tp, fp, tn, fn)
        assert row["n_positives"] == tp + fn and row["n_negatives"] == tn + fp
        assert row["balanced_accuracy"] == pytest.approx((tp / (tp + fn) + tn / (tn + fp)) / 2) == row["score"]
        assert row["ci_low"] <= row["score"] <= row["ci_high"]
    assert n_wrong >= len(fuzz_rows)

    # the fuzzing prompt marks exactly the stored marks, on the window's tokens
    for entry in decoded_requests(store, rid):
        if not entry["purpose"].startswith("fuzz:"):
            continue
        shown = [text for _, text in EXCERPT.findall(entry["request"]["messages"][1]["content"])]
        items = store.sql("SELECT seq_id, window_start, window_end, marks FROM scorer_examples WHERE run_id = ? AND "
                          "scorer = 'fuzzing' AND layer = ? AND feature = ? AND condition = ? AND NOT control ORDER BY item",
                          params=[rid, entry["layer"], entry["feature"], entry["purpose"][5:]]).fetchall()
        assert len(shown) == len(items)
        for text, (seq, lo, hi, marks) in zip(shown, items):
            # judges read merged text: split characters decoded with EDGE tokens of context on each side
            from featurestore.interp.evidence import EDGE
            from featurestore.text import merge_partial_bytes

            ctx = store.sql("SELECT t.pos, v.token, CASE WHEN v.partial_utf8 THEN v.raw END FROM tokens t "
                            "JOIN vocab v USING (token_id) WHERE seq_id = ? AND pos BETWEEN ? AND ? ORDER BY pos",
                            params=[seq, lo - EDGE, hi + EDGE]).fetchall()
            merged = dict(zip([c[0] for c in ctx], merge_partial_bytes([c[2] for c in ctx], [c[1] for c in ctx])))
            tokens = [(c[0], merged[c[0]]) for c in ctx if lo <= c[0] <= hi]
            assert text.replace("<<<", "").replace(">>>", "") == "".join(t for _, t in tokens)
            expected, inside = "", False  # each run of consecutive marked positions wrapped once
            for p, t in tokens:
                if (p in marks) != inside:
                    expected += "<<<" if not inside else ">>>"
                    inside = not inside
                expected += t
            assert text == expected + (">>>" if inside else "")

    # embedding: AUROC of the cosine similarities, computed here by hand from the texts sent
    embed_rows = store.sql("SELECT * FROM scorer_scores WHERE scorer = 'embedding' AND run_id = ?", params=[rid]).pl().to_dicts()
    assert len(embed_rows) == 6 * 4
    by_purpose = {}
    for entry in decoded_requests(store, rid):
        if entry["purpose"].startswith(("embed:", "control-embed:")):
            by_purpose[(entry["layer"], entry["feature"], entry["purpose"])] = entry["request"]["input"]
    for row in embed_rows:
        purpose = f"{'control-embed' if row['control'] else 'embed'}:{row['condition']}"
        inputs = by_purpose[(row["layer"], row["feature"], purpose)]
        labels = [l for (l,) in store.sql(
            "SELECT label FROM scorer_examples WHERE run_id = ? AND scorer = 'embedding' AND layer = ? AND feature = ? "
            "AND condition = ? AND control = ? ORDER BY item",
            params=[rid, row["layer"], row["feature"], row["condition"], row["control"]]).fetchall()]
        description = np.array(vector(inputs[0]))
        sims = [float(np.dot(vector(t), description) / np.linalg.norm(vector(t))) for t in inputs[1:]]
        pos = [s for s, l in zip(sims, labels) if l]
        neg = [s for s, l in zip(sims, labels) if not l]
        wins = sum(1.0 if p > n else 0.5 if abs(p - n) < 1e-12 else 0.0 for p in pos for n in neg)
        assert row["auroc"] == pytest.approx(wins / (len(pos) * len(neg))) == row["score"]
        assert row["ci_low"] <= row["auroc"] <= row["ci_high"]
        # the same excerpts as detection, in the same order
        det = store.sql("SELECT label FROM detection_examples WHERE run_id = ? AND layer = ? AND feature = ? AND "
                        "condition = ? AND control = ? ORDER BY item",
                        params=[rid, row["layer"], row["feature"], row["condition"], row["control"]]).fetchall()
        assert [l for (l,) in det] == labels

    # the per-feature side-by-side comparison and the export carry every scorer
    from featurestore.interp import feature_scores

    table = feature_scores(store, rid)
    assert table.height == 6
    for column in ("detection_top_balanced_accuracy", "detection_top_ci_low", "fuzzing_lower_balanced_accuracy",
                   "fuzzing_lower_ci_high", "embedding_top_auroc", "embedding_lower_ci_low", "description"):
        assert column in table.columns
    first = table.row(0, named=True)
    expected = store.sql("SELECT auroc FROM scorer_scores WHERE run_id = ? AND scorer = 'embedding' AND NOT control AND "
                         "condition = 'top' AND layer = ? AND feature = ?",
                         params=[rid, first["layer"], first["feature"]]).fetchall()[0][0]
    assert first["embedding_top_auroc"] == pytest.approx(expected)


def test_embedding_answers_are_validated_and_errors_are_rows(store):
    calls = Counter()

    def bad_embedder(body, n):
        calls["n"] += 1
        if calls["n"] % 2:  # every other answer is one vector short: invalid, asked again
            return Reply(body={"object": "list", "data": [{"index": 0, "embedding": [1.0, 0.0]}]})
        return Embedder()(body, n)

    with OpenAIStub(Scripted(), bad_embedder) as stub:
        result = autointerp(store, settings(stub, "m"), features="0:1,1:2", evidence=EVIDENCE, progress=False, api_key="k",
                            scorers="embedding", embeddings=settings(stub, "e", answer_attempts=1), control=False)
    rows = store.sql("SELECT status, error FROM scorer_scores WHERE run_id = ?", params=[result.run_id]).fetchall()
    assert len(rows) == 4 and Counter(s for s, _ in rows) == {"ok": 2, "error": 2}
    assert {e for s, e in rows if s == "error"} == {"invalid answer after 1 tries: 1 embeddings for 9 inputs"}
    # fuzzing answers are validated like detection's, and an endpoint without json_schema gets the fallback
    from openai_stub import error_reply

    def no_schema(body, n):
        if (body.get("response_format") or {}).get("type") == "json_schema":
            return error_reply(400, "response_format json_schema is not supported", param="response_format")
        if request_kind(body) == "fuzz" and not calls["fuzz"]:
            calls["fuzz"] += 1
            return Reply(content='{"1": "yes"}')
        return Scripted()(body, n)

    with OpenAIStub(no_schema) as stub:
        fuzzed = autointerp(store, settings(stub, "m", answer_attempts=1), features="0:1,1:2", evidence=EVIDENCE,
                            progress=False, api_key="k", scorers="fuzzing", control=False)
        formats = {(b.get("response_format") or {}).get("type") for b in stub.bodies()}
    assert formats == {"json_schema", "json_object"}
    rows = store.sql("SELECT status, error FROM scorer_scores WHERE run_id = ?", params=[fuzzed.run_id]).fetchall()
    assert len(rows) == 4 and Counter(s for s, _ in rows) == {"ok": 3, "error": 1}
    assert {e for s, e in rows if s == "error"} == {"invalid answer after 1 tries: answer for excerpt 1 is 'yes', "
                                                    "not true or false"}
    assert fuzzed.counts == {"ok": 2}
    with pytest.raises(fs.UserError, match="embeddings model"):
        autointerp(store, JudgeSettings(), scorers=["embedding"], api_key="k")
    with pytest.raises(fs.UserError, match="unknown scorer"):
        autointerp(store, JudgeSettings(), scorers=["simulation"], api_key="k")


def test_rescoring_makes_no_explanation_request(store, tmp_path):
    from exporters.interp_json import export_autointerp

    with OpenAIStub(Scripted()) as stub:
        first = autointerp(store, settings(stub, "explainer-model"), n_per_layer=2, evidence=EVIDENCE, progress=False,
                           api_key="k", control=False)
        path = export_autointerp(store, tmp_path / "autointerp.json", first.run_id)
        n_first = len(stub.requests)
        again = autointerp(store, settings(stub, "other-explainer"), evidence=EVIDENCE, progress=False, api_key="k",
                           scorers="fuzzing", scorer=settings(stub, "scorer-model"), descriptions=first.run_id,
                           control=False)
        from_run = stub.bodies()[n_first:]
        n_second = len(stub.requests)
        # a file in the original's format, with one description edited: that text is what gets scored
        document = json.loads(path.read_text())
        document["features"][0]["description"] = "an edited description of several words about wait tokens"
        edited = tmp_path / "edited.json"
        edited.write_text(json.dumps(document))
        third = autointerp(store, settings(stub, "other-explainer"), evidence=EVIDENCE, progress=False, api_key="k",
                           scorers=("detection",), descriptions=str(edited), control=False)
        from_file = stub.bodies()[n_second:]
    assert again.run_id != first.run_id and third.run_id not in (first.run_id, again.run_id)
    assert Counter(request_kind(b) for b in from_run) == {"fuzz": 6 * 2}
    assert Counter(request_kind(b) for b in from_file) == {"detect": 6 * 2}
    assert {b["model"] for b in from_run} == {"scorer-model"}
    old = {(l, f): d for l, f, d in store.sql("SELECT layer, feature, description FROM explanations WHERE run_id = ?",
                                              params=[first.run_id]).fetchall()}
    copied = store.sql("SELECT layer, feature, description, judge_model, base_url_host, n_requests FROM explanations "
                       "WHERE run_id = ?", params=[again.run_id]).fetchall()
    assert {(l, f): d for l, f, d, *_ in copied} == old
    assert {(m, n) for *_, m, _, n in copied} == {("explainer-model", 0)}
    imported = store.sql("SELECT layer, feature, description, judge_model, base_url_host FROM explanations "
                         "WHERE run_id = ? ORDER BY layer, feature", params=[third.run_id]).fetchall()
    assert {m for *_, m, h in imported} == {"explainer-model"} and {h for *_, h in imported} == {"imported"}
    target = (document["features"][0]["layer"], document["features"][0]["feature"])
    assert [d for l, f, d, *_ in imported if (l, f) == target] == [document["features"][0]["description"]]
    assert any(document["features"][0]["description"] in b["messages"][1]["content"] for b in from_file)
    # the same held-out excerpts as the first run (same seed and evidence settings)
    first_items = store.sql("SELECT layer, feature, condition, item, seq_id, pos FROM detection_examples WHERE run_id = ? "
                            "ORDER BY ALL", params=[first.run_id]).fetchall()
    third_items = store.sql("SELECT layer, feature, condition, item, seq_id, pos FROM detection_examples WHERE run_id = ? "
                            "ORDER BY ALL", params=[third.run_id]).fetchall()
    assert first_items == third_items

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"features": [{"layer": 0, "feature": 1}]}))
    with pytest.raises(fs.UserError, match="has no description"):
        autointerp(store, JudgeSettings(), descriptions=str(bad), api_key="k")
    with pytest.raises(fs.UserError, match="no successful explanations"):
        autointerp(store, JudgeSettings(), descriptions="no-such-run", api_key="k")


KILL_SCRIPT = """
import sys
import featurestore as fs
from featurestore.interp import EvidenceSettings, JudgeSettings, autointerp
store = fs.open(sys.argv[1])
s = JudgeSettings(model="m", base_url=sys.argv[2], concurrency=4, timeout_s=120)
e = JudgeSettings(model="e", base_url=sys.argv[2], concurrency=4, timeout_s=120)
autointerp(store, s, n_per_layer=2, evidence=EvidenceSettings(before=6, after=3, n_top=6, n_lower=3, n_test_top=4,
           n_test_lower=4, top_pool=20), flush_rows=1, flush_seconds=0.05, progress=False, api_key="k",
           run_id="killed-scorers", scorers="detection,fuzzing,embedding", embeddings=e)
"""


def test_killed_scoring_run_resumes_without_repeating_a_request(store):
    state = {"hang": True, "served": 0}
    lock = threading.Lock()
    judge, embedder = Scripted(), Embedder(vector)

    def gate():
        with lock:
            state["served"] += 1
            fast = state["served"] <= 20
        while not fast and state["hang"]:
            time.sleep(0.05)

    def respond(body, n):
        gate()
        return judge(body, n)

    def embed(body, n):
        gate()
        return embedder(body, n)

    with OpenAIStub(respond, embed) as stub:
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(store.path), stub.base_url])
        try:
            deadline = time.monotonic() + 120
            while len([r for r in read_rows(store.path, "requests", "killed-scorers") if r["outcome"] == "ok"]) < 12:
                assert proc.poll() is None, "the run ended before it was killed"
                assert time.monotonic() < deadline, "no results were written"
                time.sleep(0.1)
            time.sleep(0.3)
        finally:
            proc.kill()
            proc.wait()
        paid = [r for r in read_rows(store.path, "requests", "killed-scorers") if r["outcome"] == "ok"]
        assert len(paid) >= 12
        sent_before = len(stub.requests)
        state["hang"] = False
        resumed = autointerp(store, settings(stub, "m"), n_per_layer=2, evidence=EVIDENCE, progress=False, api_key="k",
                             run_id="killed-scorers", scorers="detection,fuzzing,embedding",
                             embeddings=settings(stub, "e"))
        after = [json.dumps(b, sort_keys=True) for b in stub.bodies()[sent_before:]]
    assert resumed.resumed
    for row in paid:  # no request that was answered and recorded before the kill is sent again
        body = json.loads(decompress_text(row["request_zstd"]))
        assert json.dumps(body, sort_keys=True) not in after, row["purpose"]
    done = store.sql("SELECT count(*), count(*) FILTER (WHERE status = 'ok') FROM scorer_scores WHERE run_id = "
                     "'killed-scorers'").fetchall()
    assert done == [(6 * 2 * 4, 6 * 2 * 4)]  # 6 features x 2 scorers x (2 conditions, real and control)
    assert store.sql("SELECT count(*) FROM detection_scores WHERE run_id = 'killed-scorers' AND status = 'ok'"
                     ).fetchall() == [(6 * 4,)]


def test_dry_run_shows_every_scorer(store):
    with OpenAIStub() as stub:
        plan = autointerp(store, settings(stub, "m"), n_per_layer=2, evidence=EVIDENCE, dry_run=True, api_key="k",
                          scorers="detection,fuzzing,embedding", embeddings=settings(stub, "e"))
        assert len(stub.requests) == 0
    assert plan.n_requests == 6 * (1 + 3 * 2 * 2)
    text = plan.text()
    assert text.count("===== fuzz (top) L") == 2 and text.count("===== embed (top) L") == 2
    assert "<<<" in text.split("===== fuzz (top)")[1]
    assert not (store.path / "interp").exists()
    for view in ("scorer_scores", "scorer_examples"):  # typed and empty before any run
        assert store.sql(f"SELECT count(*) FROM {view}").fetchall() == [(0,)]
    assert store.sql("SELECT typeof(marks) FROM scorer_examples").description[0][0] == "typeof(marks)"


# ---- issue 16: the judges' files load with a reader written from the original's file layout

def read_original_autointerp(path) -> dict:
    """What a script written for the original auto_interp.py output does: typed keys, then arithmetic."""
    doc = json.loads(path.read_text())
    meta = doc["metadata"]
    for key, kind in {"input_dir": str, "data_path": str, "model": str, "tokenizer": str, "max_tokens": int,
                      "n_per_layer": int, "min_freq": float, "seed": int, "n_processed": int,
                      "mean_detection_top_accuracy": float, "mean_detection_random_accuracy": float}.items():
        assert isinstance(meta[key], kind) and not isinstance(meta[key], bool), (key, meta[key])
    out = {}
    for f in doc["features"]:
        for key, kind in {"layer": int, "feature": int, "cantor_id": int, "description": str, "reasoning": str,
                          "n_examples": int, "activation_freq": float}.items():
            assert isinstance(f[key], kind) and not isinstance(f[key], bool), (key, f[key])
        assert f["cantor_id"] == (f["layer"] + f["feature"]) * (f["layer"] + f["feature"] + 1) // 2 + f["feature"]
        for condition in ("top", "random"):
            for metric in ("accuracy", "precision", "recall"):
                value = f[f"detection_{condition}_{metric}"]
                assert isinstance(value, float) and 0.0 <= value <= 1.0
        f["mean_accuracy"] = (f["detection_top_accuracy"] + f["detection_random_accuracy"]) / 2  # arithmetic works
        out[(f["layer"], f["feature"])] = f
    assert meta["n_processed"] == len(out)
    return {"metadata": meta, "features": out}


def read_original_classifications(path) -> dict:
    doc = json.loads(path.read_text())
    meta = doc["metadata"]
    for key, kind in {"input_dir": str, "model": str, "n_per_layer": int, "min_freq": float, "seed": int,
                      "n_classified": int}.items():
        assert isinstance(meta[key], kind) and not isinstance(meta[key], bool), (key, meta[key])
    out = {}
    for f in doc["features"]:
        assert f["category"] in ("language", "domain", "reasoning", "uninterpretable")
        assert f["confidence"] in ("high", "medium", "low")
        assert (f["mechanism"] is not None) == (f["category"] == "reasoning")
        assert (f["domain_type"] is not None) == (f["category"] == "domain")
        for key in ("category_description", "llm_reasoning"):
            assert isinstance(f[key], str)
        for key in ("mechanism_description", "input_pattern", "output_pattern"):
            assert f[key] is None or isinstance(f[key], str)
        assert isinstance(f["n_examples"], int) and isinstance(f["activation_freq"], float)
        assert isinstance(f["top_logits"], list) and all(isinstance(t, str) for t in f["top_logits"])
        out[(f["layer"], f["feature"])] = f
    assert meta["n_classified"] == len(out)
    return {"metadata": meta, "features": out}


def test_exports_load_with_the_original_readers(store, tmp_path):
    from exporters.interp_json import export_autointerp, export_classifications
    from featurestore.interp import classify

    failed = Counter()

    def respond(body, n):
        if request_kind(body) == "detect" and not failed["n"]:
            failed["n"] += 1
            return Reply(content="{}")  # the first detection answer is invalid: that condition becomes an error row
        return Scripted()(body, n)

    chosen = "0:1,0:2,1:2"
    with OpenAIStub(respond, Embedder(vector)) as stub:
        run = autointerp(store, settings(stub, "explainer-model", answer_attempts=1), features=chosen, n_per_layer=250,
                         evidence=EVIDENCE, progress=False, api_key="k", scorers="detection,fuzzing,embedding",
                         embeddings=settings(stub, "embed-model"))
        classify(store, settings(stub, "judge"), features=chosen, n_per_layer=250, evidence=EVIDENCE, progress=False,
                 api_key="k")
    doc = read_original_autointerp(export_autointerp(store, tmp_path / "autointerp.json", run.run_id))
    meta, features = doc["metadata"], doc["features"]
    assert meta["n_per_layer"] == 2 and meta["features_per_layer"] == {"0": 2, "1": 1} and meta["features_chosen"]
    assert meta["scorers"] == ["detection", "fuzzing", "embedding"] and meta["embeddings_model"] == "embed-model"
    assert "0.0" in meta["missing_values"]
    assert set(features) == {(0, 1), (0, 2), (1, 2)}
    stats = {(l, f): (n, q) for l, f, n, q in store.sql(
        "SELECT layer, feature, activation_count, activation_freq FROM features WHERE source = 'transcoder'").fetchall()}
    rows = store.sql("SELECT layer, feature, condition, status, tp, fp, tn, fn FROM detection_scores WHERE run_id = ? "
                     "AND NOT control", params=[run.run_id]).fetchall()
    errors = [(l, f, c) for l, f, c, status, *_ in rows if status != "ok"]
    assert len(errors) == 1
    for layer, feature, condition, status, tp, fp, tn, fn in rows:
        f = features[(layer, feature)]
        name = "top" if condition == "top" else "random"
        if status != "ok":  # a number, and said so
            assert f[f"detection_{name}_accuracy"] == 0.0 and f["missing_conditions"] == [f"detection_{name}"]
            continue
        assert f[f"detection_{name}_accuracy"] == pytest.approx((tp + tn) / (tp + fp + tn + fn))
        assert f[f"detection_{name}_precision"] == pytest.approx(tp / (tp + fp) if tp + fp else 0.0)
        assert f[f"detection_{name}_recall"] == pytest.approx(tp / (tp + fn))
        assert f[f"detection_{name}_ci_low"] <= f[f"detection_{name}_balanced_accuracy"] <= f[f"detection_{name}_ci_high"]
    ok_top = [(tp + tn) / (tp + fp + tn + fn) for _, _, c, s, tp, fp, tn, fn in rows if c == "top" and s == "ok"]
    assert meta["mean_detection_top_accuracy"] == pytest.approx(sum(ok_top) / len(ok_top))
    for key, f in features.items():
        count, freq = stats[key]
        assert f["n_examples"] == min(20, count) + min(10, count)  # the original's meaning: top + random of the JSON
        assert f["n_examples_explained"] == EVIDENCE.n_top + EVIDENCE.n_lower  # this pipeline's count, own name
        assert f["activation_freq"] == pytest.approx(freq)
        for scorer, metric in (("fuzzing", "balanced_accuracy"), ("embedding", "auroc")):
            for name, condition in (("top", "top"), ("random", "lower")):
                value = store.sql(f"SELECT {metric} FROM scorer_scores WHERE run_id = ? AND scorer = ? AND layer = ? "
                                  "AND feature = ? AND condition = ? AND NOT control",
                                  params=[run.run_id, scorer, *key, condition]).fetchall()
                assert f[f"{scorer}_{name}_{metric}"] == pytest.approx(value[0][0])

    doc = read_original_classifications(export_classifications(store, tmp_path / "feature_classifications.json"))
    assert doc["metadata"]["n_per_layer"] == 2 and doc["metadata"]["features_per_layer"] == {"0": 2, "1": 1}
    for key, f in doc["features"].items():
        assert f["n_examples"] == min(EVIDENCE.n_top, stats[key][0])  # top examples shown, as in the original
        assert f["n_examples_shown"] >= f["n_examples"]


def test_cli_scorers_rescore_and_side_by_side(store, tmp_path, monkeypatch, capsys):
    from cli.main import main

    monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-secret")
    small = ["--before", "6", "--after", "3", "--n-top", "6", "--n-lower", "3", "--n-test", "4", "--concurrency", "2"]
    with OpenAIStub(Scripted(), Embedder(vector)) as stub:
        assert main(["autointerp", str(store.path), "--features", "0:1,1:2", "--explainer-model", "writer",
                     "--explainer-base-url", stub.base_url, "--no-control", *small]) == 0
        store.refresh()  # the CLI wrote through its own handle
        first = store.sql("SELECT DISTINCT run_id FROM explanations").fetchall()[0][0]
        n = len(stub.requests)
        assert main(["autointerp", str(store.path), "--rescore-from", first, "--scorers", "fuzzing,embedding",
                     "--scorer-model", "reader", "--scorer-base-url", stub.base_url, "--embeddings-model", "emb",
                     "--no-control", *small]) == 0
        later = stub.bodies()[n:]
    assert Counter(request_kind(b) for b in later) == {"fuzz": 4, "embed": 4}
    assert {b["model"] for b in later} == {"reader", "emb"}
    out = capsys.readouterr().out
    assert "fuzzing" in out and "embedding" in out
    store.refresh()
    rescored = store.sql("SELECT run_id FROM interp_runs ORDER BY started_at DESC LIMIT 1").fetchall()[0][0]
    target = tmp_path / "scores.csv"
    assert main(["autointerp-scores", str(store.path), "--run", rescored, "--out", str(target)]) == 0
    header = target.read_text().splitlines()[0].split(",")
    assert header[:3] == ["layer", "feature", "description"]
    assert {"fuzzing_top_balanced_accuracy", "fuzzing_top_ci_low", "embedding_lower_auroc"} <= set(header)
    capsys.readouterr()
    assert main(["autointerp-scores", str(store.path), "--run", rescored]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:3] == ["feature", "fuzzing_top", "bal.acc"] and len(printed) == 3
    assert "embedding_lower auroc" in printed[0] and printed[1].startswith("L0F1 ")
    # a user error is one line and exit 2
    assert main(["autointerp", str(store.path), "--scorers", "embedding", *small]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the embedding scorer needs an embeddings model (--embeddings-model)"]
    # the key is never stored
    for path in store.path.rglob("*"):
        if path.is_file():
            assert b"sk-cli-secret" not in path.read_bytes()
