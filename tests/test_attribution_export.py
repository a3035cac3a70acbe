"""Compact pruning vs circuit-tracer's padded pruning, and the graph JSON vs circuit-tracer's own writer and models."""
from __future__ import annotations

import json
import multiprocessing
import math

import pytest
import torch

from attribution import attribute, prune
from exporters import graph_json
from featurestore.errors import UserError
from featurestore.ids import cantor
from test_attribution_support import build_checkpoint, load, prompt_text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt"), seed=5)


@pytest.fixture(scope="module")
def graph(checkpoint):
    model, tokenizer = load(checkpoint)
    return attribute(model, tokenizer, prompt_text(9, offset=2), max_feature_nodes=10**6, batch_size=8)


def circuit_tracer_config(checkpoint, n_layers=3):
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    return UnifiedConfig(n_layers=n_layers, d_model=32, d_head=8, n_heads=4, d_mlp=48, d_vocab=64,
                         tokenizer_name=str(checkpoint), model_name=str(checkpoint),
                         original_architecture="Qwen2ForCausalLMWithTranscoder", n_key_value_heads=2)


def random_dag(seed: int, n_features: int, n_tokens: int, n_logits: int, density: float):
    """A random adjacency in [features | tokens | logits] order whose edges only go from earlier nodes to later ones."""
    generator = torch.Generator().manual_seed(seed)
    size = n_features + n_tokens + n_logits
    order = torch.randperm(n_features, generator=generator)  # a topological order of the features
    rank = torch.empty(size, dtype=torch.long)
    rank[:n_features] = order + n_tokens
    rank[n_features:n_features + n_tokens] = torch.arange(n_tokens)
    rank[n_features + n_tokens:] = n_features + n_tokens
    weights = torch.randn(size, size, generator=generator) * torch.rand(size, size, generator=generator).pow(3)
    allowed = (rank[None, :] < rank[:, None]) & (torch.rand(size, size, generator=generator) < density)
    allowed[n_features:n_features + n_tokens] = False  # tokens have no inputs
    allowed[:, n_features + n_tokens:] = False  # logits are no source
    adjacency = torch.where(allowed, weights, torch.zeros(()))
    probabilities = torch.softmax(torch.randn(n_logits, generator=generator), 0) * 0.9
    return adjacency, probabilities


def padded_prune(adjacency, probabilities, n_features, n_tokens, n_layers, thresholds, checkpoint):
    """circuit-tracer's prune_graph on the matrix padded with its n_layers * n_pos zero error block."""
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph, prune_graph

    n_errors = n_layers * n_tokens
    size = adjacency.shape[0] + n_errors
    keep = torch.cat([torch.arange(n_features), torch.arange(n_features + n_errors, size)])
    padded = torch.zeros(size, size)
    padded[keep[:, None], keep[None, :]] = adjacency
    ct_graph = Graph(input_string="", input_tokens=torch.zeros(n_tokens, dtype=torch.long),
                     active_features=torch.zeros(n_features, 3, dtype=torch.long), adjacency_matrix=padded,
                     cfg=circuit_tracer_config(checkpoint, n_layers), selected_features=torch.arange(n_features),
                     activation_values=torch.ones(n_features),
                     logit_targets=[LogitTarget("", i) for i in range(len(probabilities))],
                     logit_probabilities=probabilities, scan="x")
    result = prune_graph(ct_graph, *thresholds)
    return result.node_mask[keep], result.edge_mask[keep[:, None], keep[None, :]], result.cumulative_scores[keep]


@pytest.mark.parametrize("seed,thresholds", [(0, (0.8, 0.98)), (1, (0.5, 0.9)), (2, (0.95, 0.99)), (3, (0.8, 0.98))])
def test_compact_pruning_equals_circuit_tracer_on_the_padded_matrix(checkpoint, seed, thresholds):
    n_features, n_tokens, n_logits = 60 + 10 * seed, 12, 3
    adjacency, probabilities = random_dag(seed, n_features, n_tokens, n_logits, density=0.3)
    ours = prune(adjacency, probabilities, n_features, n_tokens, *thresholds)
    node_mask, edge_mask, scores = padded_prune(adjacency, probabilities, n_features, n_tokens, 4, thresholds, checkpoint)
    assert torch.equal(ours.node_mask, node_mask)
    assert torch.equal(ours.edge_mask, edge_mask)
    torch.testing.assert_close(ours.cumulative_scores, scores, rtol=1e-5, atol=1e-6)
    assert 0 < int(ours.node_mask[:n_features].sum()) < n_features  # pruning did something
    assert 0 < int(ours.edge_mask.sum()) < int((adjacency != 0).sum())


def test_compact_pruning_equals_circuit_tracer_on_a_real_graph(graph, checkpoint):
    ours = prune(graph.adjacency, graph.logit_probabilities, graph.n_selected, graph.n_pos)
    node_mask, edge_mask, scores = padded_prune(graph.adjacency, graph.logit_probabilities, graph.n_selected,
                                                graph.n_pos, graph.n_layers, (0.8, 0.98), checkpoint)
    assert torch.equal(ours.node_mask, node_mask) and torch.equal(ours.edge_mask, edge_mask)
    torch.testing.assert_close(ours.cumulative_scores, scores, rtol=1e-5, atol=1e-6)


def test_json_equals_circuit_tracer_create_graph_files(graph, checkpoint, tmp_path):
    from circuit_tracer.utils.create_graph_files import create_graph_files

    written = graph_json.write(graph, tmp_path / "ours", "run__p", "org/repo", 0.8, 0.98)
    create_graph_files(graph.to_circuit_tracer(circuit_tracer_config(checkpoint)), "run__p", str(tmp_path / "ct"),
                       scan="org/repo", node_threshold=0.8, edge_threshold=0.98)
    ours = json.loads(written.path.read_text())
    theirs = json.loads((tmp_path / "ct" / "run__p.json").read_text())
    assert ours["metadata"] == theirs["metadata"] and ours["qParams"] == theirs["qParams"]
    assert len(ours["nodes"]) == len(theirs["nodes"]) > graph.n_pos + graph.n_logits
    for a, b in zip(ours["nodes"], theirs["nodes"]):
        assert {k: v for k, v in a.items() if k != "influence"} == {k: v for k, v in b.items() if k != "influence"}
        assert (a["influence"] is None) == (b["influence"] is None)
        if a["influence"] is not None:
            assert math.isclose(a["influence"], b["influence"], rel_tol=1e-5, abs_tol=1e-6)
    assert [(l["source"], l["target"]) for l in ours["links"]] == [(l["source"], l["target"]) for l in theirs["links"]]
    assert all(math.isclose(a["weight"], b["weight"], rel_tol=1e-6) for a, b in zip(ours["links"], theirs["links"]))
    assert json.loads((tmp_path / "ours" / "graph-metadata.json").read_text()) == \
        json.loads((tmp_path / "ct" / "graph-metadata.json").read_text())


def test_json_passes_circuit_tracer_models_and_viewer_requirements(graph, tmp_path):
    from circuit_tracer.frontend.graph_models import Model

    first = graph_json.write(graph, tmp_path, "run__viewer", "./data/features-run", 0.9, 0.99)
    kept = next(n for n in first.nodes if n["feature_type"] == "cross layer transcoder")
    layer, feature = int(kept["layer"]), int(kept["node_id"].split("_")[1])
    written = graph_json.write(graph, tmp_path, "run__viewer", "./data/features-run", 0.9, 0.99,
                               descriptions={(layer, feature): "a described feature"})
    text = written.path.read_text()
    document = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    Model.model_validate(document)
    nodes = {n["node_id"]: n for n in document["nodes"]}
    assert all(l["source"] in nodes and l["target"] in nodes for l in document["links"])
    kinds = [n["feature_type"] for n in document["nodes"]]
    assert kinds.count("embedding") == graph.n_pos and kinds.count("logit") == graph.n_logits
    for node in document["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            l, f, p = map(int, node["node_id"].split("_"))
            assert node["feature"] == cantor(l, f) and node["layer"] == str(l) and node["ctx_idx"] == p
            assert node["jsNodeId"] == f"{l}_{f}-0" and isinstance(node["influence"], float)
            assert node["activation"] > 0 and p > 0  # BOS features are never nodes
            assert node["clerp"] == ("a described feature" if (l, f) == (layer, feature) else "")
        elif node["feature_type"] == "logit":
            assert "(p=" in node["clerp"] and node["clerp"].startswith('Output "')
            assert node["layer"] == str(graph.n_layers + 1) and node["ctx_idx"] == graph.n_pos - 1
        else:
            assert node["feature_type"] == "embedding" and isinstance(node["influence"], float)
    assert sum(n["is_target_logit"] for n in document["nodes"]) == 1
    assert document["metadata"]["schema_version"] == 1 and document["metadata"]["prompt_tokens"][0] == "<bos>"
    assert document["qParams"]["linkType"] == "both"
    assert any(n["clerp"] == "a described feature" for n in document["nodes"])
    entries = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert entries == [document["metadata"]] and entries[0]["node_threshold"] == 0.9
    assert not list(tmp_path.glob(".*.tmp"))


def _upsert(args):
    directory, index = args
    for repeat in range(5):
        graph_json.upsert_graph_metadata(directory, {"slug": f"g{index}", "scan": "s", "repeat": repeat})


def test_graph_metadata_upserts_by_slug_under_a_lock(tmp_path):
    graph_json.upsert_graph_metadata(tmp_path, {"slug": "a", "scan": "old"})
    graph_json.upsert_graph_metadata(tmp_path, {"slug": "b", "scan": "s"})
    graph_json.upsert_graph_metadata(tmp_path, {"slug": "a", "scan": "new"})
    entries = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert [(e["slug"], e["scan"]) for e in entries] == [("b", "s"), ("a", "new")]
    with multiprocessing.get_context("fork").Pool(6) as pool:
        pool.map(_upsert, [(tmp_path, i) for i in range(12)])
    slugs = sorted(e["slug"] for e in json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"])
    assert slugs == sorted(["a", "b"] + [f"g{i}" for i in range(12)])


def test_write_rejects_bad_slugs_and_scans(graph, tmp_path):
    with pytest.raises(UserError, match="slug"):
        graph_json.write(graph, tmp_path, "has space", "scan")
    with pytest.raises(UserError, match="scan"):
        graph_json.write(graph, tmp_path, "ok", "")
    assert not any(tmp_path.iterdir())


def test_partial_influences_equal_circuit_tracer():
    from circuit_tracer.graph import compute_partial_influences

    from attribution.engine import partial_influences

    adjacency, probabilities = random_dag(7, 40, 8, 3, density=0.4)
    rows_for = torch.tensor([48, 49, 50] + list(range(0, 40, 3)))  # logits, then some features, as during attribution
    rows = adjacency[rows_for]
    ours = partial_influences(rows, rows_for, probabilities)
    theirs = compute_partial_influences(rows, probabilities, rows_for, device="cpu")
    torch.testing.assert_close(ours, theirs)
    assert ours[:40].count_nonzero() > 10
