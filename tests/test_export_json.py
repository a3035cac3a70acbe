"""Per-feature JSON against brute force from dense activations of the tiny model (tests/brute_force.py).

The store's activations match dense ones to ~4e-6 (batched vs single-sequence float32), so selections are compared
by value at each rank (exact ties may swap places) while everything an example shows (window tokens, per-token
activations, centre index) is compared at the example's own (seq_id, pos); seeded random samples, which do not
depend on values, are compared exactly.
"""
from __future__ import annotations

import json
import re

import duckdb
import numpy as np
import pytest
import torch

from brute_force import dense_run
from cli.main import main
from exporters.feature_json import DocumentOptions, export_json, feature_document, feature_document_bytes, iter_documents
from exporters.pack import feature_json_bytes
from featurestore.ids import cantor, cantor_unpair
from featurestore.modeling import load_model

TOL = dict(rel=1e-4, abs=2e-5)
OPTS = DocumentOptions(max_per_sequence=None, interval_kind="count")  # the original selection, vs brute force


@pytest.fixture(scope="module")
def dense(tiny):
    return dense_run(tiny["model"], tiny["data"])


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("json")
    summary = export_json(tiny["store"], out, options=OPTS, workers=1, progress=False)
    docs = {int(p.stem): p.read_bytes() for p in summary.path.iterdir()}
    return out, summary, docs


def live_rows(dense, layer, feature):
    """(seq_id, pos, act) of every non-zero activation, in (seq_id, pos) order."""
    out = []
    for seq in sorted(dense):
        column = dense[seq][1][layer][:, feature]
        out.extend((seq, int(p), float(column[p])) for p in np.flatnonzero(column))
    return out


def seeded_order(rows, feature, seed=0):
    con = duckdb.connect()
    keys = con.execute("SELECT hash(s::INTEGER, p::INTEGER, f::INTEGER, ?::BIGINT) FROM "
                       "(SELECT unnest(?::INTEGER[]) AS s, unnest(?::INTEGER[]) AS p, ? AS f)",
                       [seed, [r[0] for r in rows], [r[1] for r in rows], feature]).fetchall()
    return sorted(range(len(rows)), key=lambda i: (keys[i][0], rows[i][0], rows[i][1]))


def check_example(example, dense, texts, layer, feature, seq, pos):
    ids, acts = dense[seq][0], dense[seq][1][layer][:, feature]
    lo, hi = max(0, pos - OPTS.before), min(len(ids) - 1, pos + OPTS.after)
    assert example["tokens"] == [texts[t] for t in ids[lo:hi + 1]]
    assert example["train_token_ind"] == pos - lo
    assert example["tokens_acts_list"] == pytest.approx(acts[lo:hi + 1].tolist(), **TOL)
    return lo, hi


def locate(example, dense, layer, feature, candidates):
    """The (seq, pos) an example shows: the candidate whose window tokens and activations match."""
    for seq, pos, _ in candidates:
        ids, acts = dense[seq][0], dense[seq][1][layer][:, feature]
        lo = max(0, pos - OPTS.before)
        if pos - lo == example["train_token_ind"] and len(example["tokens_acts_list"]) == min(len(ids) - 1, pos + OPTS.after) - lo + 1 \
                and np.allclose(example["tokens_acts_list"], acts[lo:lo + len(example["tokens_acts_list"])], rtol=1e-4, atol=2e-5):
            return seq, pos
    raise AssertionError("example matches no activating token of the feature")


def test_every_live_feature_has_a_file_and_nothing_else(tiny, dense, exported):
    _, summary, docs = exported
    expected = {cantor(layer, f) for layer in range(3) for f in range(48) if live_rows(dense, layer, f)}
    assert set(docs) == expected and summary.n_features == len(expected)
    for cid, data in docs.items():
        assert data == feature_json_bytes(json.loads(data))  # canonical compact ASCII JSON
        document = json.loads(data)
        assert (document["layer"], document["feature"]) == cantor_unpair(cid)


@pytest.mark.parametrize("layer, feature", [(0, 0), (1, 5), (2, 7), (2, 40)])
def test_document_equals_brute_force(tiny, dense, exported, layer, feature):
    store, texts = tiny["store"], tiny["store"].token_texts()
    rows = live_rows(dense, layer, feature)
    if not rows:
        pytest.skip("dead feature in this model")
    document = json.loads(exported[2][cantor(layer, feature)])
    groups = {g["quantile_name"]: g["examples"] for g in document["examples_quantiles"]}
    total = sum(len(ids) for ids, _ in dense.values())
    assert document["activation_frequency"] == len(rows) / total
    # top activations: the k largest values, in order, each showing its own window
    top = groups["Top activations"]
    expected_values = sorted((r[2] for r in rows), reverse=True)[:OPTS.top_k]
    shown = [ex["tokens_acts_list"][ex["train_token_ind"]] for ex in top]
    assert shown == pytest.approx(expected_values, **TOL)
    by_value = sorted(rows, key=lambda r: -r[2])
    windows = []
    for example in top:
        seq, pos = locate(example, dense, layer, feature, by_value)
        windows.append((seq, *check_example(example, dense, texts, layer, feature, seq, pos)))
    # random samples: exactly the first n rows in the seeded order
    order = seeded_order(rows, feature)
    expected_random = [rows[i] for i in order[:OPTS.n_random]]
    assert len(groups["Random samples"]) == len(expected_random)
    for example, (seq, pos, _) in zip(groups["Random samples"], expected_random):
        windows.append((seq, *check_example(example, dense, texts, layer, feature, seq, pos)))
    # interval groups: values inside their stated range, taken in seeded order
    ordered = np.sort([r[2] for r in rows])
    n = len(ordered)
    quantile = lambda num, den: ordered[max((num * n + den - 1) // den - 1, 0)]  # noqa: E731
    assert document["quantile_values"] == pytest.approx([quantile(k, 100) for k in range(1, 101)], **TOL)
    interval_groups = [g for g in document["examples_quantiles"][2:]]
    assert [g["quantile_name"].split(" (")[0] for g in interval_groups] == \
        [f"Interval {a}-{a + 20}%" for a in (80, 60, 40, 20, 0)][:len(interval_groups)]
    seeded = [rows[i] for i in order]
    for group in interval_groups:
        low, high = (float(x) for x in re.search(r"\((\S+) to (\S+)\)", group["quantile_name"]).groups())
        inside = [r for r in seeded if low * (1 - 1e-3) - 1e-5 <= r[2] <= high * (1 + 1e-3) + 1e-5]
        for example in group["examples"]:
            seq, pos = locate(example, dense, layer, feature, inside[:OPTS.per_interval + 2])
            windows.append((seq, *check_example(example, dense, texts, layer, feature, seq, pos)))
    # repeated = window overlaps an earlier example's window in the same sequence (document order)
    flags = [ex["is_repeated_datapoint"] for g in document["examples_quantiles"] for ex in g["examples"]]
    expected_flags = [any(s == s2 and lo <= h2 and lo2 <= hi for s2, lo2, h2 in windows[:i]) for i, (s, lo, hi) in enumerate(windows)]
    assert flags == expected_flags
    # act range over all shown windows; histogram of all activations over it
    all_acts = [a for g in document["examples_quantiles"] for ex in g["examples"] for a in ex["tokens_acts_list"]]
    assert (document["act_min"], document["act_max"]) == (pytest.approx(min(all_acts), **TOL), pytest.approx(max(all_acts), **TOL))
    counts = np.histogram(ordered, bins=OPTS.histogram_bins, range=(document["act_min"], document["act_max"]))[0]
    assert sum(document["histogram"]) == n
    assert np.abs(np.array(document["histogram"]) - counts).sum() <= 4
    # logit lens: lm_head @ decoder column, top and bottom 10
    net, _ = load_model(str(tiny["model"]), dtype="float32", device="cpu")
    with torch.no_grad():
        scores = net.lm_head.weight @ net.model.layers[layer].mlp.transcoder_dec.weight[:, feature]
    assert document["top_logits"] == [texts[i] for i in torch.topk(scores, 10).indices.tolist()]
    assert document["bottom_logits"] == [texts[i] for i in torch.topk(-scores, 10).indices.tolist()]


def test_selection_agrees_with_the_store_api(tiny, exported):
    store = tiny["store"]
    for layer, feature in [(0, 3), (1, 5), (2, 11)]:
        handle = store.feature(layer, feature)
        document = json.loads(exported[2][cantor(layer, feature)])
        groups = {g["quantile_name"]: g["examples"] for g in document["examples_quantiles"]}
        for name, examples in (("Top activations", handle.top_examples(20, max_per_sequence=None)), ("Random samples", handle.random_examples(10, seed=0))):
            assert [(g["tokens"], g["train_token_ind"]) for g in groups[name]] == [(e.tokens, e.train_token_ind) for e in examples]
            assert [g["tokens_acts_list"] for g in groups[name]] == [pytest.approx(e.acts, rel=1e-5) for e in examples]
        assert handle.to_json(max_per_sequence=None, interval_kind="count") == document
        assert feature_document_bytes(store, layer, feature, options=OPTS) == exported[2][cantor(layer, feature)]


def test_partial_utf8_tokens_show_as_hex_escapes(tiny):
    store = tiny["store"]
    partial = dict(store.sql("SELECT token_id, token FROM vocab WHERE partial_utf8 AND token_id IN "
                             "(SELECT token_id FROM tokens)").fetchall())
    assert partial, "the tiny corpus should split some multi-byte character"
    busiest = store.sql("SELECT feature FROM features WHERE layer = 0 ORDER BY activation_count DESC LIMIT 1").fetchall()[0][0]
    document = feature_document(store, 0, busiest, options=DocumentOptions(top_k=100_000, n_random=0, n_intervals=0, max_per_sequence=None))
    tokens = [t for g in document["examples_quantiles"] for ex in g["examples"] for t in ex["tokens"]]
    assert "\ufffd" not in "".join(tokens)
    assert set(partial.values()) & set(tokens)
    assert all(re.fullmatch(r"(\\x[0-9a-f]{2})+", text) for text in partial.values())


def test_options_dead_features_and_iteration(tiny, exported):
    store = tiny["store"]
    dead = store.sql("SELECT f FROM range(48) t(f) WHERE f NOT IN (SELECT feature FROM features WHERE layer = 1)").fetchall()
    if dead:
        assert store.feature(1, dead[0][0]).to_json() is None
    small = store.feature(1, 5).to_json(top_k=3, n_random=2, before=2, after=1, n_intervals=2, per_interval=1, histogram_bins=7)
    names = [g["quantile_name"] for g in small["examples_quantiles"]]
    assert names[:2] == ["Top activations", "Random samples"] and len(names) <= 4
    assert [len(g["examples"]) for g in small["examples_quantiles"]][:2] == [3, 2]
    assert all(len(ex["tokens"]) <= 4 for g in small["examples_quantiles"] for ex in g["examples"])
    assert len(small["histogram"]) == 7 and len(small["quantile_values"]) == 100
    firsts = list(iter_documents(store, options=OPTS, layers=[2]))
    assert [(l, f) for l, f, _ in firsts] == sorted((l, f) for l, f, _ in firsts) and {l for l, _, _ in firsts} == {2}
    assert firsts[0][2] == json.loads(exported[2][cantor(2, firsts[0][1])])


def test_cli_export_json_writes_features_and_metadata(tiny, tmp_path, capsys, exported):
    out = tmp_path / "feature_data"
    assert main(["export", "json", str(tiny["store_path"]), "--out", str(out), "--workers", "1",
                 "--max-per-sequence", "0", "--interval-kind", "count"]) == 0
    assert "feature files" in capsys.readouterr().out
    files = {int(p.stem): p.read_bytes() for p in (out / "features").iterdir()}
    assert files == exported[2]
    metadata = json.loads((out / "feature_metadata.json").read_text())
    assert len(metadata["features"]) == len(files)
    # a second export replaces the folder whole; a stray file in it is not kept
    (out / "features" / "999999.json").write_text("{}")
    assert main(["export", "json", str(tiny["store_path"]), "--out", str(out), "--workers", "1", "--no-metadata"]) == 0
    assert not (out / "features" / "999999.json").exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
