"""Attribution graphs as the circuit-tracer 0.5.0 viewer reads them: ``{slug}.json`` + ``graph-metadata.json``.

Node ids, kinds and fields follow circuit-tracer's ``frontend/graph_models.py``; the graph is pruned on
its compact matrix first. ``{slug}.json`` is written atomically, and ``graph-metadata.json`` is
upserted by slug under an exclusive file lock, so parallel runs into one directory keep each other's entries.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from featurestore.errors import UserError
from featurestore.ids import cantor
from featurestore.storage import write_bytes_atomic

if TYPE_CHECKING:  # torch-free at import: `featurestore serve` reads METADATA_FILE and check_slug from here
    from attribution.graph import Graph
    from attribution.prune import PruneResult

FEATURE_TYPE = "cross layer transcoder"  # the only feature_type for which the viewer loads examples
METADATA_FILE = "graph-metadata.json"
_SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_QPARAMS = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}


@dataclass
class WrittenGraph:
    path: Path
    nodes: list[dict]
    links: list[dict]
    metadata: dict
    pruned: PruneResult


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_node_id: str, *,
          token_prob: float = 0.0, is_target_logit: bool = False, clerp: str = "",
          influence: float | None = None, activation: float | None = None) -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
            "token_prob": token_prob, "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js_node_id, "clerp": clerp, "influence": influence, "activation": activation}


def build_nodes(graph: Graph, kept, influence, descriptions: Mapping[tuple[int, int], str] | None) -> dict[int, dict]:
    """Node dicts keyed by compact node index, for the nodes the pruning kept."""
    n_sel, n_pos = graph.n_selected, graph.n_pos
    features = graph.feature_nodes().tolist()
    activations = graph.activation_values[graph.selected_features].tolist()
    tokens = graph.input_tokens.tolist()
    target_index = graph.target_logit_index
    nodes = {}
    for index in kept:
        if index < n_sel:
            layer, pos, feature = features[index]
            clerp = (descriptions or {}).get((layer, feature), "")
            nodes[index] = _node(f"{layer}_{feature}_{pos}", cantor(layer, feature), str(layer), pos, FEATURE_TYPE,
                                 f"{layer}_{feature}-0", clerp=clerp, influence=influence[index],
                                 activation=activations[index])
        elif index < n_sel + n_pos:
            pos = index - n_sel
            nodes[index] = _node(f"E_{tokens[pos]}_{pos}", pos, "E", pos, "embedding", f"E_{tokens[pos]}-{pos}",
                                 influence=influence[index])
        else:
            j = index - n_sel - n_pos
            vocab, prob, last = int(graph.logit_tokens[j]), float(graph.logit_probabilities[j]), n_pos - 1
            layer = str(graph.n_layers + 1)
            nodes[index] = _node(f"{layer}_{vocab}_{last}", vocab, layer, last, "logit", f"L_{vocab}-{last}",
                                 token_prob=prob, is_target_logit=j == target_index,
                                 clerp=f'Output "{graph.logit_strings[j]}" (p={prob:.3f})')
    return nodes


def build_graph_json(graph: Graph, slug: str, scan: str, node_threshold: float, edge_threshold: float,
                     descriptions: Mapping[tuple[int, int], str] | None = None) -> tuple[dict, PruneResult]:
    """The viewer's graph object (metadata, qParams, nodes, links) and the pruning behind it."""
    from attribution.prune import prune

    pruned = prune(graph.adjacency, graph.logit_probabilities, graph.n_selected, graph.n_pos,
                   node_threshold, edge_threshold)
    kept = pruned.node_mask.nonzero()[:, 0].tolist()
    nodes = build_nodes(graph, kept, pruned.cumulative_scores.tolist(), descriptions)
    targets, sources = (pruned.edge_mask & pruned.node_mask[:, None] & pruned.node_mask[None, :]).nonzero().unbind(1)
    weights = graph.adjacency[targets, sources].tolist()
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": w}
             for t, s, w in zip(targets.tolist(), sources.tolist(), weights)]
    linked = {link["source"] for link in links} | {link["target"] for link in links}
    used = [node for node in nodes.values() if node["node_id"] in linked or node["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": graph.token_strings,
                "prompt": graph.prompt, "node_threshold": node_threshold, "schema_version": 1}
    return {"metadata": metadata, "qParams": dict(_QPARAMS), "nodes": used, "links": links}, pruned


def check_slug(slug: str) -> str:
    if not _SLUG.match(slug):
        raise UserError(f"graph slug {slug!r} must be letters, digits, '.', '_' or '-' (it becomes a URL)")
    return slug


def write(graph: Graph, out_dir: str | os.PathLike, slug: str, scan: str, node_threshold: float = 0.8,
          edge_threshold: float = 0.98, descriptions: Mapping[tuple[int, int], str] | None = None) -> WrittenGraph:
    """Prune ``graph``, write ``{out_dir}/{slug}.json`` atomically and upsert ``graph-metadata.json``.

    ``scan`` tells the viewer where features load from: a Hub repo id holding an uploaded pack, or
    ``./data/<subdir>`` for per-feature JSON files in ``out_dir/<subdir>``. ``descriptions`` maps
    (layer, feature) to a label shown on the feature node.
    """
    check_slug(slug)
    if not scan:
        raise UserError("scan must be a non-empty string (a Hub repo id or ./data/<dir>)")
    out = Path(out_dir)
    document, pruned = build_graph_json(graph, slug, scan, node_threshold, edge_threshold, descriptions)
    path = write_bytes_atomic(out / f"{slug}.json", _dumps(document))
    upsert_graph_metadata(out, document["metadata"])
    return WrittenGraph(path, document["nodes"], document["links"], document["metadata"], pruned)


def _dumps(document: dict) -> bytes:
    try:
        return json.dumps(document, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")
    except ValueError as exc:  # NaN/inf would not parse in the browser
        raise UserError(f"graph contains a non-finite number: {exc}") from None


@contextmanager
def _locked(directory: Path):
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / f".{METADATA_FILE}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def upsert_graph_metadata(out_dir: str | os.PathLike, entry: dict) -> Path:
    """Replace the entry with ``entry["slug"]`` (or add it) in ``graph-metadata.json``, under a lock."""
    out = Path(out_dir)
    path = out / METADATA_FILE
    with _locked(out):
        index = {"graphs": []}
        if path.exists():
            try:
                index = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                raise UserError(f"{path} is not valid JSON; fix or remove it") from None
        graphs = [g for g in index.get("graphs", []) if g.get("slug") != entry["slug"]]
        graphs.append(entry)
        index["graphs"] = graphs
        write_bytes_atomic(path, json.dumps(index, ensure_ascii=False, allow_nan=False, indent=2).encode("utf-8"))
    return path
