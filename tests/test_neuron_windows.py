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
