"""`upload DIR` recognises the kind of folder and defaults --path-in-repo to where the viewer expects it."""
from __future__ import annotations

import json

import pytest

from cli.main import main
from exporters.hub_upload import plan_upload
from exporters.pack import feature_json_bytes, pack_entry, write_pack
from featurestore.ids import cantor


def _document(layer: int, feature: int) -> dict:
    return {"layer": layer, "feature": feature, "examples_quantiles": [{"quantile_name": "Top activations", "examples": [
        {"tokens": ["a", "b"], "tokens_acts_list": [0.0, 1.5], "train_token_ind": 1, "is_repeated_datapoint": False}]}]}


@pytest.fixture()
def folders(tmp_path):
    pack = tmp_path / "pack"
    write_pack(pack, range(2), 3, ((l, f, pack_entry(feature_json_bytes(_document(l, f)))) for l in range(2) for f in (0, 2)))
    feature_json = tmp_path / "json"
    feature_json.mkdir()
    for layer, feature in ((0, 0), (1, 2)):
        (feature_json / f"{cantor(layer, feature)}.json").write_bytes(feature_json_bytes(_document(layer, feature)))
    graphs = tmp_path / "run-graphs"
    graphs.mkdir()
    (graphs / "graph-metadata.json").write_text(json.dumps({"graphs": [{"slug": "g1"}]}))
    (graphs / "g1.json").write_text(json.dumps({"metadata": {}, "qParams": {}, "nodes": [], "links": []}))
    return {"pack": pack, "json": feature_json, "graphs": graphs}


@pytest.mark.parametrize("kind, path, described", [("pack", "features", "a feature pack"),
                                                   ("json", "feature-json", "a per-feature JSON folder"),
                                                   ("graphs", "graphs", "a graph folder")])
def test_dry_run_shows_the_inferred_path(folders, capsys, monkeypatch, kind, path, described):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    directory = folders[kind]
    assert main(["upload", str(directory), "--repo", "me/feats", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    files = sorted(p.name for p in directory.iterdir())
    for name in files:
        assert f"{name} -> https://huggingface.co/me/feats/blob/main/{path}/{name} ({(directory / name).stat().st_size} bytes)" in lines
    assert f"path in repo: {path} (the default for {described})" in lines
    assert ("scan: me/feats" in lines) == (kind == "pack")
    plan = plan_upload(directory, "me/feats")
    assert plan.kind == kind and plan.path_in_repo == path and {remote for _, remote, _ in plan.files} == \
        {f"{path}/{name}" for name in files}


def test_an_explicit_path_is_kept_and_a_graph_folder_under_features_is_flagged(folders, capsys):
    assert main(["upload", str(folders["graphs"]), "--repo", "me/feats", "--path-in-repo", "features", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "path in repo: features (chosen with --path-in-repo for a graph folder)" in lines
    assert any(line.startswith("note: features is where the viewer looks for a feature pack") for line in lines)
