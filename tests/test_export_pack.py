"""The pack streamed from the store: round trip against `export json`, determinism, dead features, CLI and bad input."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from cli.main import main
from exporters.feature_json import export_json, export_pack
from exporters.pack import DEAD_STUB, PackReader, pack_json_dir
from exporters.integrity import verify
from featurestore.ids import cantor


def tree(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def outputs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("packs")
    export_json(tiny["store"], root / "json", workers=1, progress=False)
    export_pack(tiny["store"], root / "pack", workers=1, progress=False)
    return root


def test_round_trip_equals_exported_json(tiny, outputs):
    reader = PackReader(outputs / "pack")
    files = {int(p.stem): p.read_bytes() for p in (outputs / "json" / "features").iterdir()}
    assert reader.layers() == [0, 1, 2]
    for layer in range(3):
        offsets = reader.index[str(layer)]["offsets"]
        assert len(offsets) == 48 + 1
        for feature in range(48):
            raw = reader.read_raw(layer, feature)
            if cantor(layer, feature) not in files:
                assert raw is None
                continue
            assert gzip.decompress(raw[4:]) == files[cantor(layer, feature)]
            assert reader.read(layer, feature) == json.loads(files[cantor(layer, feature)])
    report = verify(outputs / "pack")
    assert report.ok and report.checked == len(files)


def test_deterministic_across_runs_workers_and_from_json(tiny, outputs, tmp_path):
    export_pack(tiny["store"], tmp_path / "again", workers=2, progress=False)
    assert tree(tmp_path / "again") == tree(outputs / "pack")
    pack_json_dir(outputs / "json" / "features", tmp_path / "from_json", n_layers=3, n_features=48, progress=False)
    assert tree(tmp_path / "from_json") == tree(outputs / "pack")


def test_dead_features_keep_equal_offsets_or_get_stubs(tiny, tmp_path):
    import featurestore as fs

    store = fs.collect(str(tiny["model"]), str(tiny["data"]), tmp_path / "n", source="neuron", neurons_per_layer=5, seed=2,
                       layers=[0, 2], chunk_size=8, batch_tokens=512, progress=False, max_samples=8)
    live = {(l, f) for l, f in store.sql("SELECT layer, feature FROM features WHERE source = 'neuron'").fetchall()}
    plain = export_pack(store, tmp_path / "plain", source="neuron", workers=1, progress=False)
    stub = export_pack(store, tmp_path / "stub", source="neuron", dead_stub=True, workers=1, progress=False)
    assert plain.layers == stub.layers == [0, 1, 2] and plain.n_features == 64  # every layer, d_mlp units each
    assert plain.entries == stub.entries == len(live) and stub.dead == 3 * 64 - len(live)
    plain_reader, stub_reader = PackReader(tmp_path / "plain"), PackReader(tmp_path / "stub")
    for layer in range(3):
        for unit in range(64):
            if (layer, unit) in live:
                document = plain_reader.read(layer, unit)
                assert document["is_neuron"] is True and stub_reader.read(layer, unit) == document
            else:
                _, start, end = plain_reader.span(layer, unit)
                assert start == end and stub_reader.read(layer, unit) == DEAD_STUB
    assert verify(tmp_path / "plain", n_layers=3).ok and verify(tmp_path / "stub", n_layers=3).ok


def test_cli_pack_verify_and_from_json(tiny, outputs, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["export", "pack", str(tiny["store_path"]), "--out", str(out), "--workers", "1"]) == 0
    assert "144 entries" in capsys.readouterr().out
    assert tree(out) == tree(outputs / "pack")
    assert main(["export", "verify", str(out), "--n-layers", "3"]) == 0
    assert main(["export", "pack", "--from-json", str(outputs / "json" / "features"), "--out", str(tmp_path / "q"),
                 "--n-layers", "3", "--n-features", "48"]) == 0
    assert tree(tmp_path / "q") == tree(out)
    assert main(["upload", str(out), "--repo", "me/tiny", "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "scan: me/tiny"


def assert_one_line_error(code, err, *needles):
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_bad_input(tiny, tmp_path, capsys):
    store = str(tiny["store_path"])
    assert_one_line_error(main(["export", "pack", str(tmp_path), "--out", str(tmp_path / "o")]), capsys.readouterr().err,
                          "not a feature store")
    assert_one_line_error(main(["export", "json", store, "--out", str(tmp_path / "o"), "--source", "neuron"]),
                          capsys.readouterr().err, "no neuron activations")
    empty = tmp_path / "empty"
    shutil.copytree(tiny["store_path"], empty)
    manifest = json.loads((empty / "featurestore.json").read_text())
    manifest["chunks"] = []
    (empty / "featurestore.json").write_text(json.dumps(manifest))
    for command in ("json", "pack", "metadata"):
        assert_one_line_error(main(["export", command, str(empty), "--out", str(tmp_path / "o")]), capsys.readouterr().err,
                              "no transcoder activations")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for command in ("json", "pack", "metadata"):
        extra = [] if command == "metadata" else ["--workers", "1"]
        assert_one_line_error(main(["export", command, store, "--out", str(blocker / "out"), *extra]),
                              capsys.readouterr().err, "cannot")
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "empty"]  # no staging leftovers
    assert_one_line_error(main(["export", "pack", "--out", str(tmp_path / "o")]), capsys.readouterr().err, "either STORE or --from-json")
    assert_one_line_error(main(["export", "json", store, "--out", str(tmp_path / "o"), "--layers", "7"]),
                          capsys.readouterr().err, "not collected")


def test_failure_midway_leaves_nothing_under_the_final_name(tiny, tmp_path, monkeypatch):
    import exporters.feature_json as feature_json

    calls = {"n": 0}
    real = feature_json.fetch_block

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(feature_json, "fetch_block", failing)
    with pytest.raises(RuntimeError):
        export_pack(tiny["store"], tmp_path / "pack", workers=1, progress=False)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        export_json(tiny["store"], tmp_path / "json", workers=1, progress=False)
    assert not (tmp_path / "pack").exists() and not (tmp_path / "json" / "features").exists()
    assert [p.name for p in tmp_path.rglob(".*")] == []
