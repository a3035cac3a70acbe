"""Exports of any shape: a full-width (8192-feature) layer with few activations per feature, and a feature that
fires on every token, through `export json`, `export pack` and `export metadata` (the CLI, a real collection)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from cli.main import main
from conftest import build_tiny_model, build_tokenizer, make_rows, write_jsonl
from exporters.feature_queries import MAX_BLOCK_FEATURES, plan_blocks
from exporters.pack import PackReader
from featurestore.ids import cantor

N_FEATURES = 8192
ALWAYS = 4100  # fires (act 1.0) on every token: weights zero, bias 1
SMALL = ["--top-k", "3", "--random", "2", "--before", "4", "--after", "2", "--intervals", "2", "--per-interval", "1",
         "--workers", "1"]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    import featurestore as fs

    root = tmp_path_factory.mktemp("wide")
    rows = make_rows(3, seed=5)
    data = write_jsonl(root / "data.jsonl", rows)
    tokenizer = build_tokenizer(root / "tok", [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"]
                                              for r in rows])
    model = build_tiny_model(root / "model", tokenizer, layers=1, n_features=N_FEATURES, enc_bias=0.2)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.0.mlp.transcoder_enc.weight"][ALWAYS] = 0.0
    weights["model.layers.0.mlp.transcoder_enc.bias"][ALWAYS] = 1.0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    store = fs.collect(str(model), str(data), root / "store", progress=False)
    return root, store


def test_layer_is_full_width_with_a_4096_feature_block(wide):
    _, store = wide
    live = store.sql("SELECT count(*) FROM features WHERE layer = 0").fetchall()[0][0]
    assert live > 2 * MAX_BLOCK_FEATURES * 0.95
    blocks = plan_blocks(store, "transcoder", 0)
    assert max(len(b) for b in blocks) == MAX_BLOCK_FEATURES  # the shape that overflowed the packed key


def test_json_pack_and_metadata_of_a_full_width_layer(wide, tmp_path):
    _, store = wide
    tokens = store.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
    counts = dict(store.sql("SELECT feature, activation_count FROM features WHERE layer = 0").fetchall())
    assert counts[ALWAYS] == tokens
    path = str(store.path)
    assert main(["export", "json", path, "--out", str(tmp_path / "j"), *SMALL]) == 0
    files = {int(p.stem): p.read_bytes() for p in (tmp_path / "j" / "features").iterdir()}
    assert sorted(files) == sorted(cantor(0, f) for f in counts)
    for feature in (0, ALWAYS - 1, ALWAYS, N_FEATURES - 1):
        if feature not in counts:
            continue
        doc = json.loads(files[cantor(0, feature)])
        assert doc["feature"] == feature and doc["layer"] == 0
        assert doc["activation_frequency"] == pytest.approx(counts[feature] / tokens)
        assert sum(doc["histogram"]) == counts[feature]
    always = json.loads(files[cantor(0, ALWAYS)])
    assert always["activation_frequency"] == 1.0 and always["act_min"] == always["act_max"] == 1.0
    top = always["examples_quantiles"][0]["examples"]
    assert len(top) == 3 and all(set(e["tokens_acts_list"]) == {1.0} for e in top)  # every window token active
    metadata = json.loads((tmp_path / "j" / "feature_metadata.json").read_text())
    by_feature = {m["feature"]: m for m in metadata["features"]}
    assert len(by_feature) == len(counts)
    assert by_feature[ALWAYS]["count" if "count" in by_feature[ALWAYS] else "activation_count"] == tokens

    assert main(["export", "pack", path, "--out", str(tmp_path / "p"), *SMALL]) == 0
    reader = PackReader(tmp_path / "p")
    for feature in range(N_FEATURES):
        doc = reader.read(0, feature)
        if feature in counts:
            assert doc == json.loads(files[cantor(0, feature)])
        else:
            assert doc is None


def test_metadata_command_of_a_full_width_layer(wide, tmp_path):
    _, store = wide
    assert main(["export", "metadata", str(store.path), "--out", str(tmp_path)]) == 0
    metadata = json.loads((tmp_path / "feature_metadata.json").read_text())
    live = store.sql("SELECT count(*) FROM features WHERE layer = 0").fetchall()[0][0]
    assert len(metadata["features"]) == live
    assert np.isfinite([m.get("activation_frequency", 0.0) for m in metadata["features"]]).all()


def test_packed_key_parts_are_checked_not_overflowed():
    from exporters.feature_queries import POS_BITS, row_key
    from featurestore.errors import UserError

    key = row_key(np.array([MAX_BLOCK_FEATURES - 1]), np.array([2**31 - 1]), np.array([2**POS_BITS - 1]))
    assert key[0] == 2**63 - 1  # the largest parts fill the 63 bits exactly, still positive
    with pytest.raises(UserError, match="token position 1048576 is outside 0..1048575"):
        row_key(np.array([0]), np.array([0]), np.array([2**POS_BITS]))
    with pytest.raises(UserError, match="feature rank in a block 4096"):
        row_key(np.array([MAX_BLOCK_FEATURES]), np.array([0]), np.array([0]))
