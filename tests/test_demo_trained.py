"""The trained demo build shows what the paper's setting shows (issue 11, item 2).

Uses the cached build (trained here once if the cache is empty: a few minutes on 2 cores; later runs and
`make demo` reuse it). The only test that uses the trained demo model; the others build tiny models.
"""
from __future__ import annotations

import json

import pytest
import torch

from featurestore.demo import TRACES_PATH, build_demo_checkpoint, training_metrics
from featurestore.demo.pipeline import PROMPTS_DIR

REASONING_WORDS = {"Wait", "Hmm", "Actually", "Hold"}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    import featurestore as fs

    root = tmp_path_factory.mktemp("trained-demo")
    checkpoint = build_demo_checkpoint(root / "checkpoint", progress=False)
    store = fs.collect(str(checkpoint), str(TRACES_PATH), root / "store", progress=False)
    return {"checkpoint": checkpoint, "store": store, "root": root}


def test_reasoning_beats_base_and_adapters_recover_the_kl_gap(build):
    m = training_metrics(build["checkpoint"])
    assert m["heldout_thinking_tokens"] > 3000
    assert m["reasoning_thinking_accuracy"] >= m["base_thinking_accuracy"] + 0.2, m
    assert m["kl_adapters_off"] > 0.3
    assert m["kl_gap_recovered"] >= 0.5, m
    assert m["kl_adapters_on"] <= 0.5 * m["kl_adapters_off"]


def test_sparse_with_few_dead_features(build):
    m = training_metrics(build["checkpoint"])
    l0 = m["l0_per_layer"]
    assert 2 <= sum(l0) / len(l0) <= 20, l0
    assert all(d <= 0.12 * m["config"]["n_features"] for d in m["dead_features_per_layer"]), m  # built: 6 / 46 / 0
    # the store, collected over all traces, agrees: 2-20 active features per token per layer
    rows = build["store"].sql("""SELECT f.layer, sum(f.activation_count) / any_value(t.n_tokens)
        FROM features f JOIN source_tokens t USING (source) GROUP BY f.layer""").fetchall()
    assert len(rows) == m["config"]["num_hidden_layers"] and all(2 <= v <= 20 for _, v in rows), rows


def test_thinking_specific_and_reasoning_word_features(build):
    store = build["store"]
    specific = store.sql("""SELECT a.layer, a.feature FROM activations a JOIN tokens t USING (seq_id, pos)
        GROUP BY a.layer, a.feature HAVING count(*) >= 50 AND avg((t.region = 'thinking')::INT) >= 0.9""").fetchall()
    assert len(specific) >= 5, specific
    words = store.sql("""SELECT DISTINCT trim(token) FROM logit_lens
        WHERE side = 'top' AND rank < 3 AND trim(token) IN ('Wait', 'Hmm', 'Actually', 'Hold')""").fetchall()
    assert {"Wait", "Hmm"} & {w for (w,) in words}, words


def test_attribution_prompts_are_predicted_and_graphs_span_positions(build):
    from attribution.prompts import prompt_files, read_prompt_file
    from attribution.runner import attribute_prompts
    from featurestore.modeling import load_model, load_tokenizer

    model, _ = load_model(str(build["checkpoint"]), device="cpu", dtype="float32")
    tokenizer = load_tokenizer(build["checkpoint"])
    files = prompt_files(PROMPTS_DIR)
    assert len(files) >= 2
    for path in files:
        prompt = read_prompt_file(path, tokenizer)
        with torch.no_grad():
            probs = model(input_ids=torch.tensor([prompt.tokens])).logits[0, -1].softmax(-1)
        assert int(probs.argmax()) == prompt.target, path.name
        assert float(probs[prompt.target]) >= 0.3, (path.name, float(probs[prompt.target]))
    graphs = build["root"] / "graphs"
    outcomes = attribute_prompts(str(build["checkpoint"]), PROMPTS_DIR, graphs, "demo", log=lambda _: None,
                                 progress=False, device="cpu")
    assert all(o.status == "written" for o in outcomes), outcomes
    for outcome in outcomes:
        graph = json.loads((graphs / f"{outcome.slug}.json").read_text())
        positions = {n["ctx_idx"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"}
        assert len(positions) >= 3, (outcome.slug, positions)
