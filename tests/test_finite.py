"""Finite activations only: collection refuses NaN/Infinity (naming the layer, and the checkpoint tensor when the
weights are at fault) before anything is committed; exports of adversarial stores write only valid JSON."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file, save_file

import featurestore as fs
from cli.main import main
from exporters.feature_json import DocumentOptions, export_json, export_pack
from exporters.metadata import export_metadata
from exporters.pack import PackReader
from featurestore.errors import UserError
from featurestore.manifest import Manifest, is_store


def edited_model(tiny, tmp_path, edit):
    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    weights = load_file(model / "model.safetensors")
    edit(weights)
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    return model


def nan_encoder_rows(weights):
    weights["model.layers.1.mlp.transcoder_enc.weight"][[3, 9, 17, 30, 41]] = float("nan")


def test_nan_encoder_rows_are_refused_naming_layer_and_tensor(tiny, tmp_path, capsys):
    model = edited_model(tiny, tmp_path, nan_encoder_rows)
    with pytest.raises(UserError, match=r"^layer 1: checkpoint tensor model\.layers\.1\.mlp\.transcoder_enc\.weight "):
        fs.collect(str(model), str(tiny["data"]), tmp_path / "store", progress=False)
    assert not is_store(tmp_path / "store")
    assert main(["collect", "-m", str(model), "-d", str(tiny["data"]), "-s", str(tmp_path / "store2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: layer 1: checkpoint tensor model.layers.1.mlp.transcoder_enc.weight")
    assert not is_store(tmp_path / "store2")


def test_weights_of_uncollected_layers_do_not_matter(tiny, tmp_path):
    def nan_last_layer(weights):
        weights["model.layers.2.mlp.transcoder_enc.weight"][0] = float("nan")

    store = fs.collect(str(edited_model(tiny, tmp_path, nan_last_layer)), str(tiny["data"]), tmp_path / "store",
                       layers=[0, 1], progress=False)
    assert store.sql("SELECT count(*) FROM activations WHERE isnan(act) OR isinf(act)").fetchall() == [(0,)]


def test_overflowing_activations_are_refused_before_any_commit(tiny, tmp_path):
    def overflow(weights):  # finite weights whose pre-activation overflows float32 to +Infinity
        weights["model.layers.0.mlp.transcoder_enc.weight"][5] = 1e37
        weights["model.layers.0.mlp.transcoder_enc.bias"][5] = 3.4e38

    model = edited_model(tiny, tmp_path, overflow)
    with pytest.raises(UserError, match=r"^non-finite transcoder activations \(NaN or Infinity\) at layer 0, although"):
        fs.collect(str(model), str(tiny["data"]), tmp_path / "store", chunk_size=8, progress=False)
    assert Manifest.load(tmp_path / "store").chunks == []
    assert not list((tmp_path / "store").rglob("activations/**/*.parquet"))


def test_nan_neurons_are_refused(tiny, tmp_path):
    def nan_up(weights):
        weights["model.layers.1.mlp.up_proj.weight"][7] = float("nan")

    with pytest.raises(UserError, match=r"^layer 1: checkpoint tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        fs.collect(str(edited_model(tiny, tmp_path, nan_up)), str(tiny["data"]), tmp_path / "n", source="neuron",
                   neurons_per_layer=64, progress=False)
    assert not is_store(tmp_path / "n")


def add_chunk(store_dir, chunk: int, layer: int, rows) -> None:
    """Commit one more activations chunk through the project's own writer (no tokens: it reuses stored sequences)."""
    from featurestore.collection import ChunkWriter

    manifest = Manifest.load(store_dir)
    n_units = manifest.model["n_features"]
    writer = ChunkWriter(store_dir, "transcoder", {layer: np.arange(n_units)}, commit=manifest.commit_chunk)
    feature, seq, pos, act = (np.asarray(c, dtype=t) for c, t in zip(rows, (np.int64, np.int32, np.int32, np.float32)))
    count = np.bincount(feature, minlength=n_units)
    total = np.bincount(feature, weights=act.astype(np.float64), minlength=n_units)
    peak = np.zeros(n_units, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        np.maximum.at(peak, feature, act)
    part = writer.submit(writer.write_part, chunk, layer, 0, (feature, seq, pos, act))
    record = {"source": "transcoder", "chunk": chunk, "rows": [0, 0], "n_sequences": 0, "n_skipped": 0, "n_tokens": 0,
              "files": {}}
    writer.submit(writer.write_chunk, record, [part], {}, {layer: (count, total, peak)})
    writer.close()


def strict_json(data: bytes):
    def refuse(name):
        raise AssertionError(f"{name} in an exported document")

    return json.loads(data, parse_constant=refuse)


def check_document(doc):
    assert np.isfinite([doc["act_min"], doc["act_max"], doc["activation_frequency"], *doc["quantile_values"]]).all()
    for section in doc["examples_quantiles"]:
        for example in section["examples"]:
            assert len(example["tokens"]) == len(example["tokens_acts_list"])
            assert 0 <= example["train_token_ind"] < len(example["tokens"])
            assert np.isfinite(example["tokens_acts_list"]).all()


@pytest.fixture
def adversarial(tiny, tmp_path):
    """The tiny store plus a chunk that repeats stored rows (twice within itself too), with huge and tiny values."""
    store_dir = tmp_path / "store"
    shutil.copytree(tiny["store_path"], store_dir)
    store = fs.open(store_dir)
    rows = store.con.execute("SELECT feature, seq_id, pos FROM activations WHERE layer = 1 AND feature IN (2, 5) "
                             "ORDER BY feature, seq_id, pos LIMIT 6").fetchall()
    feature, seq, pos = (list(c) * 2 for c in zip(*rows))
    act = [3.4e38, 1.4e-45, 2.5, 1e-30, 3e38, 7.0] * 2
    add_chunk(store_dir, 1000, 1, (feature, seq, pos, act))
    return store_dir, sorted(set(feature))


def test_adversarial_store_exports_only_valid_json(adversarial, tmp_path):
    store_dir, features = adversarial
    store = fs.open(store_dir)
    options = DocumentOptions(before=3, after=2)
    summary = export_json(store, tmp_path / "j", options=options, layers=[1], workers=1, progress=False)
    docs = {p.name: strict_json(p.read_bytes()) for p in summary.path.iterdir()}
    assert len(docs) == store.sql("SELECT count(*) FROM features WHERE layer = 1").fetchall()[0][0]
    for doc in docs.values():
        check_document(doc)
    huge = [d for d in docs.values() if d["feature"] in features]
    assert max(d["act_max"] for d in huge) == pytest.approx(3.4e38, rel=1e-5)
    export_pack(store, tmp_path / "p", options=options, layers=[1], workers=1, progress=False)
    reader = PackReader(tmp_path / "p")
    for feature in features:
        check_document(reader.read(1, feature))
    metadata = strict_json(export_metadata(store, tmp_path / "m", layers=[1]).read_bytes())
    assert {m["feature"] for m in metadata["features"]} >= set(features)


def test_stored_nan_is_refused_by_exports(tiny, tmp_path):
    store_dir = tmp_path / "store"
    shutil.copytree(tiny["store_path"], store_dir)
    add_chunk(store_dir, 1000, 0, ([4], [0], [1], [float("nan")]))
    with pytest.raises(UserError, match="layer 0"):
        export_json(fs.open(store_dir), tmp_path / "j", layers=[0], workers=1, progress=False)
    assert not (tmp_path / "j" / "features").exists()
    assert main(["export", "pack", str(store_dir), "--out", str(tmp_path / "p"), "--layers", "0", "--workers", "1"]) == 2
