"""``verify`` finds each kind of damage and names the feature; the CLI reports it and exits non-zero."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from cli.main import main
from exporters.pack import PackReader, feature_json_bytes, pack_entry, write_pack
from exporters.integrity import verify
from featurestore.ids import cantor

N_LAYERS, N_FEATURES = 3, 6
DEAD = {(0, 2), (2, 5)}


def document(layer: int, feature: int) -> dict:
    tokens = [f"t{i}" for i in range(5 + feature)]
    acts = [float((i * 7 + layer) % 4) for i in range(len(tokens))]
    return {"layer": layer, "feature": feature, "act_min": 0.0, "act_max": 3.0,
            "examples_quantiles": [{"quantile_name": "Top activations", "examples": [
                {"tokens": tokens, "tokens_acts_list": acts, "train_token_ind": 2, "is_repeated_datapoint": False}]}]}


@pytest.fixture()
def pack(tmp_path) -> Path:
    out = tmp_path / "features"
    live = [(l, f) for l in range(N_LAYERS) for f in range(N_FEATURES) if (l, f) not in DEAD]
    write_pack(out, range(N_LAYERS), N_FEATURES, ((l, f, pack_entry(feature_json_bytes(document(l, f)))) for l, f in live))
    return out


def problems_of(path) -> list:
    report = verify(path, workers=1)
    return report.problems


def test_good_pack_passes(pack):
    report = verify(pack)
    assert report.ok and report.kind == "pack"
    assert report.checked == N_LAYERS * N_FEATURES - len(DEAD)


def test_truncated_bin_names_the_cut_features(pack):
    reader = PackReader(pack)
    _, start, _ = reader.span(1, 4)
    path = pack / "layer_1.bin"
    path.write_bytes(path.read_bytes()[:start + 10])  # cut inside feature 4's entry
    found = problems_of(pack)
    assert {(p.layer, p.feature) for p in found} == {(1, 4), (1, 5)}
    assert all("beyond the file" in p.message for p in found)
    assert f"(id {cantor(1, 4)})" in str(found[0])


def test_corrupted_entry_is_found(pack):
    _, start, end = PackReader(pack).span(2, 3)
    path = pack / "layer_2.bin"
    data = bytearray(path.read_bytes())
    middle = (start + 4 + end) // 2
    data[middle:middle + 4] = bytes(b ^ 0xFF for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))
    found = problems_of(pack)
    assert [(p.layer, p.feature) for p in found] == [(2, 3)]
    assert "decompress" in found[0].message or "JSON" in found[0].message


def test_bad_length_prefix_and_invalid_documents(pack, tmp_path):
    def rewrite(layer, feature, raw_entry):
        data = (pack / f"layer_{layer}.bin").read_bytes()
        _, start, end = PackReader(pack).span(layer, feature)
        assert len(raw_entry) == end - start
        (pack / f"layer_{layer}.bin").write_bytes(data[:start] + raw_entry + data[end:])

    _, start, end = PackReader(pack).span(0, 0)
    original = (pack / "layer_0.bin").read_bytes()[start:end]
    rewrite(0, 0, (len(original) - 5).to_bytes(4, "little") + original[4:])
    nan_doc = gzip.compress(b'{"examples_quantiles":[],"act_max":NaN}', mtime=0)
    wrong_feature = gzip.compress(feature_json_bytes(document(0, 3)), mtime=0)
    # pad both into the size of existing entries so offsets stay valid
    for feature, payload in ((1, nan_doc), (4, wrong_feature)):
        _, s, e = PackReader(pack).span(0, feature)
        assert len(payload) + 4 <= e - s
        padded = payload + b"\0" * (e - s - 4 - len(payload))  # inflate stops at the member's end, as pako does
        rewrite(0, feature, (e - s - 4).to_bytes(4, "little") + padded)
    messages = {(p.layer, p.feature): p.message for p in problems_of(pack)}
    assert "length prefix" in messages[(0, 0)]
    assert "not valid JSON" in messages[(0, 1)]
    assert "feature field is 3, expected 4" in messages[(0, 4)]


def test_missing_layer_file(pack):
    (pack / "layer_1.bin").unlink()
    found = problems_of(pack)
    assert [(p.layer, p.feature, p.message) for p in found] == [(1, None, "layer file layer_1.bin is missing")]


@pytest.mark.parametrize("dropped, expected", [
    (["1"], ["layer 1: missing from the index", "layer 1: layer_1.bin exists but the index does not list it"]),
    (["2"], ["layer 2: layer_2.bin exists but the index does not list it"]),  # the last layer: caught by its file
])
def test_layer_missing_from_index(pack, dropped, expected):
    index = json.loads(gzip.decompress((pack / "index.json.gz").read_bytes()))
    for key in dropped:
        del index[key]
    (pack / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    assert [str(p) for p in problems_of(pack)] == expected


def test_expected_layer_count(pack):
    (pack / "layer_2.bin").unlink()
    index = json.loads(gzip.decompress((pack / "index.json.gz").read_bytes()))
    del index["2"]
    (pack / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    assert verify(pack).ok  # nothing in the directory says a third layer existed ...
    assert [str(p) for p in verify(pack, n_layers=3).problems] == ["layer 2: missing from the index"]
    assert [str(p) for p in verify(pack, n_layers=1).problems] == ["layer 1: in the index but the model has 1 layers"]


def test_non_monotone_offsets_and_trailing_bytes(pack):
    index = json.loads(gzip.decompress((pack / "index.json.gz").read_bytes()))
    offsets = index["0"]["offsets"]
    offsets[3], offsets[4] = offsets[4], offsets[3]
    (pack / "index.json.gz").write_bytes(gzip.compress(json.dumps(index).encode()))
    with open(pack / "layer_2.bin", "ab") as handle:
        handle.write(b"junk")
    found = {(p.layer, p.feature): p.message for p in problems_of(pack)}
    assert "offsets decrease" in found[(0, 3)]
    assert found[(2, None)] == "4 bytes after the last entry"


def test_broken_index(pack):
    (pack / "index.json.gz").write_bytes(b"not gzip")
    assert "not gzip-compressed JSON" in str(problems_of(pack)[0])
    (pack / "index.json.gz").unlink()
    assert "index.json.gz is missing" in str(problems_of(pack)[0])


def test_json_directory_and_graph_directory(tmp_path):
    features = tmp_path / "out" / "features"
    features.mkdir(parents=True)
    for layer, feature in ((0, 1), (2, 3)):
        (features / f"{cantor(layer, feature)}.json").write_bytes(feature_json_bytes(document(layer, feature)))
    assert verify(tmp_path / "out").ok and verify(tmp_path / "out").kind == "json"
    (features / f"{cantor(1, 1)}.json").write_bytes(feature_json_bytes(document(1, 2)))
    (features / f"{cantor(1, 2)}.json").write_text('{"examples_quantiles": [{"examples": [{"tokens": ["a"], "tokens_acts_list": []}]}]}')
    found = {(p.layer, p.feature): p.message for p in verify(features).problems}
    assert "feature field is 2, expected 1" in found[(1, 1)]
    assert "not as long as tokens" in found[(1, 2)]
    graphs = tmp_path / "graphs"
    graphs.mkdir()
    (graphs / "graph-metadata.json").write_text(json.dumps({"graphs": [{"slug": "g1"}, {"slug": "g2"}]}))
    (graphs / "g1.json").write_text(json.dumps({"metadata": {}, "qParams": {}, "nodes": [], "links": []}))
    report = verify(graphs)
    assert report.kind == "graphs" and [p.message.split(":")[0] for p in report.problems] == ["graph 'g2'"]


def test_cli_verify(pack, capsys):
    assert main(["export", "verify", str(pack)]) == 0
    out = capsys.readouterr().out
    assert f"{N_LAYERS * N_FEATURES - len(DEAD)} entries" in out and "ok" in out
    shutil.copy(pack / "layer_0.bin", pack / "layer_1.bin")  # wrong file content for layer 1's offsets
    assert main(["export", "verify", str(pack)]) == 2
    captured = capsys.readouterr()
    assert "layer 1 feature" in captured.out
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert main(["export", "verify", str(pack / "nowhere")]) == 2
    assert "not a directory" in capsys.readouterr().err
