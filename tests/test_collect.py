"""Collection correctness against brute force, regions, neurons, resume and refusal of mixed stores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featurestore as fs
from brute_force import dense_run, nonzero_rows
from conftest import build_tiny_model, make_rows, write_jsonl
from featurestore.capture import sample_neurons
from featurestore.regions import MarkerIds, assign_regions, find_markers
from featurestore.schema import REGIONS


@pytest.fixture(scope="module")
def dense(tiny):
    return dense_run(tiny["model"], tiny["data"])


def test_store_holds_exactly_the_nonzero_set(tiny, dense):
    store = tiny["store"]
    expected = nonzero_rows(dense)
    for layer, rows in expected.items():
        got = np.array(store.sql(f"SELECT feature, seq_id, pos, act FROM activations WHERE source = 'transcoder' "
                                 f"AND layer = {layer} ORDER BY feature, seq_id, pos").fetchall())
        assert len(got) == len(rows), f"layer {layer}: {len(got)} stored vs {len(rows)} non-zero"
        np.testing.assert_array_equal(got[:, :3].astype(int), rows[:, :3].astype(int))
        np.testing.assert_allclose(got[:, 3], rows[:, 3], rtol=1e-4, atol=1e-5)


def test_features_view_matches_brute_force(tiny, dense):
    store = tiny["store"]
    total = sum(len(ids) for ids, _ in dense.values())
    assert store.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0] == total
    layer = 1
    acts = np.concatenate([layers[layer] for _, layers in dense.values()])
    count = (acts > 0).sum(0)
    got = {f: (c, freq, mx, mean) for f, c, freq, mx, mean in store.sql(
        f"SELECT feature, activation_count, activation_freq, max_act, mean_act FROM features WHERE layer = {layer}").fetchall()}
    assert set(got) == set(np.flatnonzero(count))  # dead features absent
    for f, (c, freq, mx, mean) in got.items():
        assert c == count[f]
        assert freq == pytest.approx(count[f] / total)
        assert mx == pytest.approx(acts[:, f].max(), rel=1e-4)
        assert mean == pytest.approx(acts[:, f][acts[:, f] > 0].mean(), rel=1e-4)


def test_top_examples_are_the_true_top_k(tiny, dense):
    layer, k = 2, 7
    acts = {seq: layers[layer] for seq, (_, layers) in dense.items()}
    counts = sum((a > 0).sum(0) for a in acts.values())
    feature = int(np.argmax(counts))
    flat = sorted(((a[p, feature], s, p) for s, a in acts.items() for p in np.flatnonzero(a[:, feature])), key=lambda x: (-x[0], x[1], x[2]))
    examples = tiny["store"].feature(layer, feature).top_examples(k, before=5, after=3, max_per_sequence=None)
    assert [(e.seq_id, e.pos) for e in examples] == [(s, p) for _, s, p in flat[:k]]
    for e, (value, s, p) in zip(examples, flat[:k]):
        assert e.act == pytest.approx(value, rel=1e-4)
        ids = dense[s][0]
        lo, hi = max(0, p - 5), min(len(ids), p + 4)
        assert e.token_ids == ids[lo:hi].tolist()
        assert e.train_token_ind == p - lo
        np.testing.assert_allclose(e.acts, acts[s][lo:hi, feature], rtol=1e-4, atol=1e-6)


def test_random_examples_are_seeded_and_activating(tiny):
    f = tiny["store"].feature(0, 3)
    a, b, c = f.random_examples(5, seed=1), f.random_examples(5, seed=1), f.random_examples(5, seed=2)
    assert [(e.seq_id, e.pos) for e in a] == [(e.seq_id, e.pos) for e in b]
    assert [(e.seq_id, e.pos) for e in a] != [(e.seq_id, e.pos) for e in c]
    assert all(e.act > 0 and e.acts[e.train_token_ind] == e.act for e in a)


def test_vocab_and_token_text(tiny):
    store = tiny["store"]
    tok = tiny["tokenizer"]
    texts = store.token_texts()
    assert texts[tok.bos_token_id] == "<｜begin▁of▁sentence｜>"
    ids = tok("héllo ∑", add_special_tokens=False)["input_ids"]
    assert "".join(texts[i] for i in ids) == "héllo ∑" or any("\\x" in texts[i] for i in ids)
    partial = store.sql("SELECT token FROM vocab WHERE partial_utf8 LIMIT 5").fetchall()
    assert all("\\x" in t for (t,) in partial) and "\ufffd" not in "".join(texts)


def test_regions_on_hand_built_sequences():
    m = MarkerIds(bos=0, user_marker=2, assistant_marker=3, think_start=4, think_end=5)
    ids = np.array([0, 2, 9, 9, 3, 4, 9, 9, 9, 9, 5, 9, 9, 2])
    found = find_markers(ids, m)
    assert found == {"bos": 0, "user_marker": 1, "assistant_marker": 4, "think_start": 5, "think_end": 10}
    region, tpos = assign_regions(len(ids), found)
    names = [REGIONS[r] for r in region]
    assert names == ["bos", "user_marker", "question", "question", "assistant_marker", "think_start", "thinking", "thinking",
                     "thinking", "thinking", "think_end", "answer", "answer", "answer"]
    np.testing.assert_allclose(tpos[6:10], [0, 0.25, 0.5, 0.75])
    assert np.isnan(tpos[:6]).all() and np.isnan(tpos[10:]).all()
    # truncated before </think>: thinking continues to the end, without relative positions
    cut = ids[:8]
    found = find_markers(cut, m)
    assert found["think_end"] is None
    region, tpos = assign_regions(len(cut), found)
    assert [REGIONS[r] for r in region[5:]] == ["think_start", "thinking", "thinking"] and np.isnan(tpos).all()
    # a user marker after </think> is not a marker
    assert REGIONS[assign_regions(len(ids), find_markers(ids, m))[0][13]] == "answer"


def test_truncated_rows_are_kept_and_marked(tiny, tmp_path):
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "s", max_length=20, max_samples=6, progress=False)
    rows = store.sql("SELECT seq_id, n_tokens, truncated, complete, think_end FROM sequences ORDER BY seq_id").fetchall()
    assert len(rows) == 6 and all(n <= 20 for _, n, *_ in rows)
    assert any(t for _, _, t, _, _ in rows)
    for seq_id, n, truncated, complete, te in rows:
        assert complete == (te is not None)
    nulls = store.sql("SELECT count(*) FROM tokens t JOIN sequences s USING (seq_id) "
                      "WHERE s.think_end IS NULL AND t.region = 'thinking' AND t.thinking_pos IS NOT NULL").fetchall()[0][0]
    assert nulls == 0
    skipped = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "k", max_length=20, max_samples=6,
                         skip_incomplete=True, progress=False)
    kept = skipped.sql("SELECT count(*), bool_and(complete) FROM sequences").fetchall()[0]
    assert kept[0] == sum(1 for r in rows if r[3]) and kept[1] in (True, None)


def test_neuron_baseline_matches_brute_force(tiny, tmp_path):
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "n", source="neuron", neurons_per_layer=10, seed=3,
                       max_samples=12, progress=False, adapters="on")  # dense_run measures the model with adapters
    neurons = sample_neurons(64, 10, [0, 1, 2], 3)
    assert store.manifest["sources"]["neuron"]["neurons"]["1"] == neurons[1]
    data = write_jsonl(tmp_path / "first12.jsonl", tiny["rows"][:12])
    dense = dense_run(tiny["model"], data, neurons=neurons)
    layer = 1
    expected = []
    for seq_id, (_, layers) in dense.items():
        acts = layers[layer]
        for j, neuron in enumerate(neurons[layer]):
            col = acts[:, j]
            top = np.argsort(-col, kind="stable")[: min(20, len(col))]
            expected += [(neuron, seq_id, int(p)) for p in top if col[p] > 0.01]
    got = store.sql(f"SELECT feature, seq_id, pos FROM activations WHERE source = 'neuron' AND layer = {layer}").fetchall()
    assert sorted(got) == sorted(expected)
    counts = dict(store.sql(f"SELECT feature, activation_count FROM features WHERE source='neuron' AND layer={layer}").fetchall())
    all_acts = np.concatenate([layers[layer] for _, layers in dense.values()])
    for j, neuron in enumerate(neurons[layer]):
        assert counts.get(neuron, 0) == int((all_acts[:, j] > 0).sum())
    lens = store.sql(f"SELECT DISTINCT feature FROM logit_lens WHERE source='neuron' AND layer={layer}").fetchall()
    assert sorted(f for (f,) in lens) == neurons[layer]


def _snapshot(store_path: Path) -> dict:
    store = fs.open(store_path)
    out = {}
    for view, order in [("activations", "source, layer, feature, seq_id, pos"), ("tokens", "seq_id, pos"),
                        ("sequences", "seq_id"), ("logit_lens", "source, layer, feature, side, rank"),
                        ("features", "source, layer, feature"), ("vocab", "token_id")]:
        out[view] = store.sql(f"SELECT * FROM {view} ORDER BY {order}").fetchall()
    return out


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, tiny):
    rows = make_rows(240, seed=5)
    data = write_jsonl(tmp_path / "big.jsonl", rows)
    args = dict(chunk_size=2, batch_tokens=256)
    fs.collect(str(tiny["model"]), str(data), tmp_path / "full", progress=False, **args)
    script = (f"import featurestore as fs; fs.collect({str(tiny['model'])!r}, {str(data)!r}, {str(tmp_path / 'cut')!r}, "
              f"progress=False, chunk_size=2, batch_tokens=256)")
    proc = subprocess.Popen([sys.executable, "-c", script])
    manifest = tmp_path / "cut" / "featurestore.json"
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            committed = len(json.loads(manifest.read_text())["chunks"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            committed = 0
        if committed >= 3:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the collection finished before it could be killed"
    partial = len(json.loads(manifest.read_text())["chunks"])
    assert 3 <= partial < 120
    fs.collect(str(tiny["model"]), str(data), tmp_path / "cut", progress=False, **args)
    assert _snapshot(tmp_path / "cut") == _snapshot(tmp_path / "full")
    assert len(fs.open(tmp_path / "cut").manifest["chunks"]) == 120


def test_refuses_other_model_or_settings(tiny, tmp_path):
    other = build_tiny_model(tmp_path / "other", tiny["tokenizer"], seed=9)
    store = tiny["store_path"]
    before = (store / "featurestore.json").read_bytes()
    with pytest.raises(fs.UserError, match="built from model"):
        fs.collect(str(other), str(tiny["data"]), store, chunk_size=8, progress=False)
    with pytest.raises(fs.UserError, match="max_length"):
        fs.collect(str(tiny["model"]), str(tiny["data"]), store, chunk_size=8, max_length=50, progress=False)
    assert (store / "featurestore.json").read_bytes() == before
    # same settings: nothing to do, store unchanged apart from the run log
    fs.collect(str(tiny["model"]), str(tiny["data"]), store, chunk_size=8, batch_tokens=512, progress=False)
    assert json.loads((store / "featurestore.json").read_text())["chunks"] == json.loads(before)["chunks"]
