"""Neuron baseline: true-activation windows, exact counts everywhere, and the --adapters choice (issue 16)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featurestore as fs
from featurestore.errors import UserError
from featurestore.neuron_windows import WINDOW_AFTER, WINDOW_BEFORE

from tests.brute_force import dense_run

NEURONS = 24


def plain_dense(model_dir, data_path):
    """Dense neuron activations of the model without adapters, loaded as the original did (plain Qwen2 class)."""
    from transformers import Qwen2ForCausalLM

    from featurestore.data import adds_special_tokens, format_text, open_dataset
    from featurestore.modeling import load_tokenizer

    net = Qwen2ForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(model_dir)
    captured = {}

    def hook(layer):
        def fn(module, args):
            captured[layer] = args[0][0].numpy().copy()
        return fn

    handles = [layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(net.model.layers)]
    out = {}
    dataset = open_dataset(str(data_path))
    for row in dataset.rows(0, len(dataset)):
        ids = tok(format_text(row, "deepseek", tok), add_special_tokens=adds_special_tokens("deepseek"))["input_ids"]
        captured.clear()
        with torch.no_grad():
            net(torch.tensor([ids]))
        out[row.row_index] = (np.asarray(ids), dict(captured))
    for h in handles:
        h.remove()
    return out


@pytest.fixture(scope="module")
def neuron_stores(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("neurons")
    common = dict(source="neuron", neurons_per_layer=NEURONS, seed=3, chunk_size=8, batch_tokens=512, progress=False,
                  dtype="float32", device="cpu", neuron_samples=6)
    off = fs.collect(str(tiny["model"]), str(tiny["data"]), root / "off", **common)
    on = fs.collect(str(tiny["model"]), str(tiny["data"]), root / "on", adapters="on", **common)
    return {"off": off, "on": on, "root": root, "common": common}


def _neurons(store):
    return {int(k): v for k, v in store.manifest["sources"]["neuron"]["neurons"].items()}


def _table(store, table):
    files = ",".join(f"'{store.path / f}'" for f in store.manifest_obj.files(table, "neuron"))
    return store.sql(f"select * from read_parquet([{files}], hive_partitioning = true) order by all").fetchall()


def _windows(store):
    return store.sql("select layer, feature, seq_id, pos, act, top, sample_key, start, acts from "
                     "read_parquet([" + ",".join(f"'{store.path / f}'" for f in store.manifest_obj.files("neuron_windows", "neuron"))
                     + "], hive_partitioning = true)").fetchall()


@pytest.mark.parametrize("which", ["off", "on"])
def test_stored_windows_equal_dense_activations(tiny, neuron_stores, which):
    store = neuron_stores[which]
    neurons = _neurons(store)
    if which == "off":
        dense = plain_dense(tiny["model"], tiny["data"])
        dense = {s: (ids, {l: a[:, neurons[l]] for l, a in layers.items()}) for s, (ids, layers) in dense.items()}
    else:
        dense = dense_run(tiny["model"], tiny["data"], neurons=neurons)
    rows = _windows(store)
    assert rows
    negative = 0
    for layer, feature, seq_id, pos, act, top, key, start, acts in rows:
        column = dense[seq_id][1][layer][:, neurons[layer].index(feature)]
        lo, hi = max(0, pos - WINDOW_BEFORE), min(len(column) - 1, pos + WINDOW_AFTER)
        assert start == lo and len(acts) == hi - lo + 1
        np.testing.assert_allclose(acts, column[lo:hi + 1], rtol=1e-5, atol=1e-5)
        assert act == pytest.approx(column[pos], abs=1e-5) and act > 0
        negative += sum(a < 0 for a in acts)
    assert negative > 0  # negative values are carried


def test_adapters_choice_is_recorded_and_changes_neurons_only(tiny, neuron_stores):
    off, on = neuron_stores["off"], neuron_stores["on"]
    assert off.manifest["sources"]["neuron"]["adapters"] == "off"
    assert on.manifest["sources"]["neuron"]["adapters"] == "on"
    counts = lambda s: dict(((l, f), c) for l, f, c in s.sql(
        "select layer, feature, activation_count from features where source = 'neuron'").fetchall())
    a, b = counts(off), counts(on)
    assert a.keys() & b.keys()
    assert any(a.get(k) != b.get(k) for k in a.keys() | b.keys())  # layers after the first see the adapters' output
    layer0 = {k: v for k, v in a.items() if k[0] == 0}
    assert layer0 == {k: v for k, v in b.items() if k[0] == 0}  # layer 0's MLP input does not depend on adapters
    with pytest.raises(UserError, match="adapters"):
        fs.collect(str(tiny["model"]), str(tiny["data"]), neuron_stores["root"] / "off",
                   **(neuron_stores["common"] | {"adapters": "on"}))


def _dense_columns(tiny, store):
    """(layer, neuron) -> list over sequences of (seq_id, dense activations of that neuron), model without adapters."""
    neurons = _neurons(store)
    dense = plain_dense(tiny["model"], tiny["data"])
    return {(layer, n): [(s, layers[layer][:, n]) for s, (_, layers) in dense.items()]
            for layer in neurons for n in neurons[layer]}


def _find_window(columns, acts, center):
    """The (seq_id, pos) whose dense window equals ``acts`` (center at index ``center``), or None."""
    acts = np.asarray(acts, dtype=np.float64)
    for seq_id, column in columns:
        for pos in np.flatnonzero(np.abs(column - acts[center]) <= 1e-5 * max(1.0, abs(acts[center]))):
            lo = pos - center
            if lo < 0 or lo + len(acts) > len(column):
                continue
            if np.allclose(column[lo:lo + len(acts)], acts, rtol=1e-4, atol=1e-5):
                hi_ok = lo + len(acts) == len(column) or len(acts) - center - 1 == WINDOW_AFTER
                if (lo == 0 or center == WINDOW_BEFORE) and hi_ok:
                    return seq_id, pos
    return None


def test_exported_neuron_windows_equal_brute_force(tiny, neuron_stores, tmp_path):
    from exporters.feature_json import export_json

    store = neuron_stores["off"]
    columns = _dense_columns(tiny, store)
    from exporters.feature_documents import DocumentOptions

    # the original's selection (no per-sequence cap): the exact store-wide top 20
    summary = export_json(store, tmp_path, source="neuron", progress=False,
                          options=DocumentOptions(max_per_sequence=None))
    assert summary.n_features > 0
    views = {(l, f): (c, q) for l, f, c, q in store.sql(
        "select layer, feature, activation_count, activation_freq from features where source = 'neuron'").fetchall()}
    total = store.sql("select n_tokens from source_tokens where source = 'neuron'").fetchall()[0][0]
    n_examples = negative = 0
    for path in sorted((tmp_path / "features").iterdir()):
        doc = json.loads(path.read_text())
        layer, neuron = doc["layer"], doc["feature"]
        assert doc["is_neuron"] is True
        count, freq = views[(layer, neuron)]
        assert doc["activation_frequency"] == pytest.approx(freq) == pytest.approx(count / total)
        dense = columns[(layer, neuron)]
        positives = np.sort(np.concatenate([c[c > 0] for _, c in dense]))[::-1]
        assert count == len(positives)  # exact count of positive activations over all tokens
        groups = {g["quantile_name"]: g["examples"] for g in doc["examples_quantiles"]}
        top = [e["tokens_acts_list"][e["train_token_ind"]] for e in groups["Top activations"]]
        expected_top = positives[positives > 0.01][:20]
        np.testing.assert_allclose(top, expected_top, rtol=1e-4, atol=1e-6)  # the store-wide top 20, exactly
        window_values = []
        for name, examples in groups.items():
            for example in examples:
                acts = example["tokens_acts_list"]
                assert len(acts) == len(example["tokens"])
                found = _find_window(dense, acts, example["train_token_ind"])
                assert found is not None, (layer, neuron, name)
                assert acts[example["train_token_ind"]] > 0  # every example is a positive activation
                window_values.extend(acts)
                n_examples += 1
                negative += sum(a < 0 for a in acts)
        assert doc["act_min"] == pytest.approx(min(window_values)) and doc["act_max"] == pytest.approx(max(window_values))
        if "Random samples" in groups:
            assert len(groups["Random samples"]) == min(10, 6, count)  # from the uniform sample of 6 (neuron_samples)
        assert len(doc["quantile_values"]) == 100 and doc["quantile_values"][0] > 0
        assert doc["distribution_sample_size"] == min(6, count)  # what the quantiles and histogram come from
        assert sum(doc["histogram"]) == doc["distribution_sample_size"]
    assert n_examples > 100 and negative > 0


def test_counts_agree_across_view_metadata_json_and_brute_force(tiny, neuron_stores):
    from exporters.metadata import feature_metadata

    store = neuron_stores["off"]
    columns = _dense_columns(tiny, store)
    domains = {i: r["domain"] for i, r in enumerate(tiny["rows"])}
    regions = {}
    for seq_id, pos, region in store.sql("select seq_id, pos, region from tokens").fetchall():
        regions[(seq_id, pos)] = region
    view = {(l, f): (c, q) for l, f, c, q in store.sql(
        "select layer, feature, activation_count, activation_freq from features where source = 'neuron'").fetchall()}
    document = feature_metadata(store, source="neuron")
    assert {(r["layer"], r["feature"]) for r in document["features"]} == set(view)
    total = document["total_tokens"]
    for row in document["features"]:
        key = (row["layer"], row["feature"])
        count, freq = view[key]
        assert row["activation_count"] == count and row["activation_freq"] == pytest.approx(freq)
        doc = store.feature(*key, source="neuron").to_json()
        assert doc["activation_frequency"] == pytest.approx(row["activation_freq"])
        per_domain, per_region = {}, {}
        for seq_id, column in columns[key]:
            positive = np.flatnonzero(column > 0)
            per_domain[domains[seq_id]] = per_domain.get(domains[seq_id], 0) + len(positive)
            for p in positive.tolist():
                per_region[regions[(seq_id, p)]] = per_region.get(regions[(seq_id, p)], 0) + 1
        assert count == sum(per_domain.values())
        assert row["domain_fraction"] == pytest.approx({d: n / count for d, n in per_domain.items() if n})
        assert row["domain_density"] == pytest.approx({d: n / document["tokens_per_domain"][d] for d, n in per_domain.items() if n})
        assert row["region_fraction"] == pytest.approx({r: n / count for r, n in per_region.items() if n})
        assert sum(row["domain_fraction"].values()) == pytest.approx(1.0)
        # the original's approximation survives only under a name that says so: its stored top-20 rows
        stored = store.sql(f"select count(*) from activations where source = 'neuron' and layer = {key[0]} "
                           f"and feature = {key[1]}").fetchall()[0][0]
        assert row["original_approx_activation_count"] == stored <= count
        assert row["original_approx_activation_freq"] == pytest.approx(stored / total)
    assert any(r["original_approx_activation_count"] < r["activation_count"] for r in document["features"])


def test_api_examples_carry_true_windows(tiny, neuron_stores):
    store = neuron_stores["off"]
    columns = {k: dict(v) for k, v in _dense_columns(tiny, store).items()}
    (layer, neuron), = store.sql("select layer, feature from features where source = 'neuron' "
                                 "order by activation_count desc limit 1").fetchall()
    f = store.feature(layer, neuron, source="neuron")
    dense = columns[(layer, neuron)]
    tops = f.top_examples(20)
    everything = np.sort(np.concatenate(list(dense.values())))[::-1]
    np.testing.assert_allclose([e.act for e in tops], everything[:20], rtol=1e-5)
    randoms = f.random_examples(10, seed=1)
    assert len(randoms) == 6 and all(e.act > 0 for e in randoms)  # the store's uniform sample holds 6
    for e in tops + randoms:
        lo = e.pos - e.train_token_ind
        np.testing.assert_allclose(e.acts, dense[e.seq_id][lo:lo + len(e.acts)], rtol=1e-5, atol=1e-6)


def test_cli_refuses_bad_choices_with_one_line_errors(tiny, neuron_stores, tmp_path, capsys):
    from cli.main import main

    code = main(["collect", "--model", str(tiny["model"]), "--data", str(tiny["data"]), "--store", str(tmp_path / "t"),
                 "--adapters", "off"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--adapters off" in err and "Traceback" not in err
    code = main(["export", "json", str(neuron_stores["off"].path), "--out", str(tmp_path / "o"), "--source", "neuron",
                 "--before", "60"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "50 tokens before" in err and "Traceback" not in err


def test_resumed_collection_writes_the_same_windows_and_keeps_adapter_features(tiny, neuron_stores, tmp_path):
    import shutil

    shutil.copytree(tiny["store_path"], tmp_path / "s")
    before = fs.open(tmp_path / "s").sql("select * from features order by all").fetchall()
    fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "s", stop_after_chunks=2, **neuron_stores["common"])
    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "s", **neuron_stores["common"])
    reference = neuron_stores["off"]
    for table in ("neuron_windows", "neuron_counts"):
        got, want = _table(store, table), _table(reference, table)
        assert got == want and got  # chunk by chunk, the same rows as an uninterrupted run
    assert store.sql("select * from features where source = 'transcoder' order by all").fetchall() == \
        [r for r in before if r[0] == "transcoder"]


def test_store_without_windows_is_refused_not_exported_empty(neuron_stores, tmp_path):
    import shutil

    from exporters.feature_json import export_json

    shutil.copytree(neuron_stores["off"].path, tmp_path / "old")
    manifest = json.loads((tmp_path / "old" / "featurestore.json").read_text())
    del manifest["sources"]["neuron"]["windows"]  # as a store collected before neuron windows existed
    for record in manifest["chunks"]:
        record["files"].pop("neuron_windows", None)
    (tmp_path / "old" / "featurestore.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="before example windows"):
        export_json(fs.open(tmp_path / "old"), tmp_path / "out", source="neuron", progress=False)
