"""``featurestore attribute``: per-prompt errors, skipping, the target check, and graphs written into a store."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from attribution.store_output import load_graph, read_adjacency
from test_attribution_support import build_checkpoint

BOS = "<｜begin▁of▁sentence｜>"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(*args) -> int:
    from cli.main import main

    return main([str(a) for a in args])


def attribute_args(tiny, prompts, out, *extra):
    return ("attribute", "--checkpoint", tiny["model"], "--prompts", prompts, "--out", out, "--run-name", "run",
            "--batch-size", 8, "--max-feature-nodes", 40, "--device", "cpu", *extra)


def write_prompts(directory, files: dict[str, str]):
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


GOOD = f"{BOS}<｜User｜>compute the sum of two numbers<｜Assistant｜><think>\nwait the answer is"


def test_bad_prompts_are_reported_and_the_others_still_run(tiny, tmp_path, capsys):
    tokenizer = tiny["tokenizer"]
    one_token = next(w for w in ("the", "so", "x") if len(tokenizer.encode(w, add_special_tokens=False)) == 1)
    prompts = write_prompts(tmp_path / "prompts", {
        "a_good.txt": GOOD + "\n", "b_empty.txt": "", "c_one.txt": one_token, "d_bos.txt": f"{BOS}{one_token}",
        "e good.txt": GOOD.replace("sum", "energy"), "notes.md": "ignored",
    })
    out = tmp_path / "graphs"
    assert run(*attribute_args(tiny, prompts, out)) == 2
    captured = capsys.readouterr()
    assert "2 written, 0 skipped, 3 failed" in captured.out
    assert "run__b_empty: FAILED: b_empty.txt is empty" in captured.out
    assert "run__c_one: FAILED: c_one.txt has 1 token; it needs a prompt and then the target token" in captured.out
    assert "run__d_bos: FAILED: d_bos.txt has nothing between the BOS token and the target token" in captured.out
    assert "error: 3 of 5 prompts failed" in captured.err
    assert sorted(p.name for p in out.glob("*.json")) == ["graph-metadata.json", "run__a_good.json", "run__e-good.json"]
    entries = json.loads((out / "graph-metadata.json").read_text())["graphs"]
    assert sorted(e["slug"] for e in entries) == ["run__a_good", "run__e-good"]
    assert all(e["scan"] == "run" for e in entries)

    # the file's last token is the target: it is the marked logit, whatever the model prefers
    target = tokenizer.encode(GOOD, add_special_tokens=False)[-1]
    document = json.loads((out / "run__a_good.json").read_text())
    marked = [n for n in document["nodes"] if n["is_target_logit"]]
    assert len(marked) == 1 and marked[0]["feature"] == target
    assert document["metadata"]["prompt_tokens"][0] == BOS  # no second BOS was added
    assert len(document["metadata"]["prompt_tokens"]) == len(tokenizer.encode(GOOD, add_special_tokens=False)) - 1
    top = max((n for n in document["nodes"] if n["feature_type"] == "logit"), key=lambda n: n["token_prob"])
    if top["feature"] != target:
        assert "run__a_good" in captured.out.split("differs from the file's target")[1]

    assert run(*attribute_args(tiny, prompts, out)) == 2  # finished graphs are skipped, failures retried
    assert "0 written, 2 skipped, 3 failed" in capsys.readouterr().out


def test_whole_run_errors(tiny, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p", {"a.txt": GOOD})
    assert run(*attribute_args(tiny, prompts, tmp_path / "o", "--max-feature-nodes", 0)) == 2
    assert "error: max_feature_nodes (--max-feature-nodes) must be at least 1 (got 0)" in capsys.readouterr().err
    plain = build_checkpoint(tmp_path / "plain", adapters=False)
    args = list(attribute_args(tiny, prompts, tmp_path / "o"))
    args[2] = plain
    assert run(*args) == 2
    assert "has no transcoder adapter" in capsys.readouterr().err
    assert run(*attribute_args(tiny, tmp_path / "missing", tmp_path / "o")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_store_gets_the_graph_and_the_viewer_gets_local_features(tiny, tmp_path, capsys, monkeypatch):
    from featurestore.store import Store

    store_path = tmp_path / "store"
    shutil.copytree(tiny["store_path"], store_path)
    monkeypatch.setattr(Store, "descriptions", lambda self: {(l, f): f"L{l}F{f} label" for l in range(3) for f in range(48)},
                        raising=False)
    prompts = write_prompts(tmp_path / "p", {"a.txt": GOOD})
    out = tmp_path / "graphs"
    assert run(*attribute_args(tiny, prompts, out, "--store", store_path)) == 0
    assert "1 written" in capsys.readouterr().out
    document = json.loads((out / "run__a.json").read_text())
    assert document["metadata"]["scan"] == "./data/features-run"
    features = [n for n in document["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["clerp"] == f"L{n['layer']}F{n['node_id'].split('_')[1]} label" for n in features)
    for node in features:  # the viewer fetches ./data/features-run/{id}.json relative to the graph directory
        feature_doc = json.loads((out / "features-run" / f"{node['feature']}.json").read_text())
        assert "examples_quantiles" in feature_doc
    assert any(json.loads(p.read_text())["examples_quantiles"] for p in (out / "features-run").glob("*.json"))

    import featurestore as fs

    store = fs.open(store_path)
    (meta,) = store.sql("SELECT slug, scan, n_nodes, n_links, target_token_id, adjacency_file FROM graphs").fetchall()
    assert meta[:4] == ("run__a", "./data/features-run", len(document["nodes"]), len(document["links"]))
    assert meta[4] == tiny["tokenizer"].encode(GOOD, add_special_tokens=False)[-1]
    nodes = store.sql("SELECT node_id, kind, layer, feature, clerp FROM graph_nodes ORDER BY node_id").fetchall()
    assert sorted(n["node_id"] for n in document["nodes"]) == [n[0] for n in nodes]
    top_features = store.sql("""SELECT layer, feature, count(DISTINCT slug) AS graphs FROM graph_nodes
                                WHERE kind = 'feature' GROUP BY ALL ORDER BY graphs DESC, layer, feature""").fetchall()
    assert len(top_features) == len(features)
    (logit,) = [n for n in document["nodes"] if n["is_target_logit"]]
    strongest = store.sql(f"""SELECT source, weight FROM graph_links WHERE target = '{logit['node_id']}'
                              ORDER BY abs(weight) DESC""").fetchall()
    expected = sorted(((l["source"], l["weight"]) for l in document["links"] if l["target"] == logit["node_id"]),
                      key=lambda x: -abs(x[1]))
    assert [s for s, _ in strongest] == [s for s, _ in expected]
    links = store.sql("SELECT count(*) FROM graph_links WHERE source_kind = 'feature' AND source_layer IS NULL").fetchall()
    assert links == [(0,)]

    arrays = read_adjacency(store_path / meta[5])
    rebuilt = load_graph(store_path, "run__a")
    assert rebuilt.adjacency.shape == arrays["adjacency"].shape and rebuilt.n_layers == 3
    from exporters.graph_json import build_graph_json

    again, _ = build_graph_json(rebuilt, "run__a", "./data/features-run", 0.8, 0.98)
    assert [l["source"] for l in again["links"]] == [l["source"] for l in document["links"]]


def test_descriptions_from_a_polars_table():
    import polars as pl

    from attribution.store_output import _description_map

    table = pl.DataFrame({"layer": [0, 1, 2], "feature": [5, 6, 7], "description": ["a", None, "c"]})
    assert _description_map(table) == {(0, 5): "a", (2, 7): "c"}
    assert _description_map({(1, 2): "x", (3, 4): ""}) == {(1, 2): "x"}
