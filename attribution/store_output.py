"""Attribution graphs in the store: nodes, links and metadata as Parquet, the raw adjacency as zstd'd npz.

Views ``graphs``, ``graph_nodes`` and ``graph_links`` (featurestore/views.py) read them, so SQL can ask
which features appear in the most graphs or which edges into a logit are strongest.
"""
from __future__ import annotations

import datetime as _dt
import io
from pathlib import Path
from typing import Mapping

import numpy as np
import pyarrow as pa
import torch
import zstandard

from featurestore import schema
from featurestore.errors import UserError
from featurestore.ids import cantor
from featurestore.storage import store_path, write_bytes_atomic, write_parquet_atomic

from .graph import Graph

FEATURE_DIR_PREFIX = "features-"


def adjacency_bytes(graph: Graph) -> bytes:
    """Every array needed to rebuild the graph, as an npz compressed with zstd."""
    buffer = io.BytesIO()
    np.savez(
        buffer,
        adjacency=graph.adjacency.numpy(),
        active_features=graph.active_features.numpy().astype(np.int32),
        activation_values=graph.activation_values.numpy(),
        selected_features=graph.selected_features.numpy().astype(np.int64),
        input_tokens=graph.input_tokens.numpy().astype(np.int32),
        logit_tokens=graph.logit_tokens.numpy().astype(np.int32),
        logit_probabilities=graph.logit_probabilities.numpy(),
        n_layers=np.int64(graph.n_layers),
        vocab_size=np.int64(graph.vocab_size),
    )
    return zstandard.ZstdCompressor(level=10).compress(buffer.getvalue())


def read_adjacency(path) -> dict[str, np.ndarray]:
    """The arrays of a stored ``graphs/adjacency/<slug>.npz.zst`` (a local path or a store's remote path)."""
    raw = zstandard.ZstdDecompressor().decompress(store_path(path).read_bytes())
    with np.load(io.BytesIO(raw)) as arrays:
        return {name: arrays[name] for name in arrays.files}


def _description_map(found) -> dict[tuple[int, int], str]:
    """Accept ``{(layer, feature): text}`` or a table with layer, feature, description (source) columns."""
    if found is None:
        return {}
    if isinstance(found, Mapping):
        return {(int(k[0]), int(k[1])): str(v) for k, v in found.items() if v}
    if hasattr(found, "to_dicts"):  # polars
        rows = found.to_dicts()
    elif hasattr(found, "to_dict"):  # pandas
        rows = found.to_dict("records")
    else:
        rows = list(found)
    text_key = next((k for k in ("description", "label", "text") if rows and k in rows[0]), None)
    if text_key is None:
        return {}
    return {(int(r["layer"]), int(r["feature"])): str(r[text_key]) for r in rows
            if r.get(text_key) and r.get("source", "transcoder") == "transcoder"}


class StoreSink:
    """Writes each finished graph into a store and, when the scan points at local JSON, its features' JSON."""

    def __init__(self, store, out_dir: Path, run_name: str):
        self.store = store
        self.out_dir = out_dir
        self.run_name = run_name
        self.feature_dir = out_dir / f"{FEATURE_DIR_PREFIX}{run_name}"
        self.scan = f"./data/{FEATURE_DIR_PREFIX}{run_name}"
        self.note = None
        try:
            describe = getattr(store, "descriptions", None)
            self.descriptions = _description_map(describe()) if callable(describe) else {}
        except Exception as exc:  # labels are a nicety: a store without usable interp tables still gets graphs
            self.descriptions = {}
            self.note = f"note: no feature descriptions from the store ({type(exc).__name__}: {exc})"

    @classmethod
    def open(cls, path, info, out_dir: Path, run_name: str) -> "StoreSink":
        import featurestore

        store = featurestore.open(path)
        model = store.manifest.get("model", {})
        for key, ours in (("n_layers", info.n_layers), ("n_features", info.n_features), ("d_model", info.d_model)):
            if model.get(key) is not None and model.get(key) != ours:
                raise UserError(f"store {path} was collected with a different model ({key} {model.get(key)} vs {ours})")
        return cls(store, Path(out_dir), run_name)

    def add(self, graph: Graph, written, slug: str, *, node_threshold: float, edge_threshold: float,
            prompt_file: str | None = None, export_features: bool = True) -> None:
        write_graph(self.store.path, graph, written, slug, run_name=self.run_name, node_threshold=node_threshold,
                    edge_threshold=edge_threshold, prompt_file=prompt_file)
        if export_features and written.metadata["scan"] == self.scan:
            features = sorted({(int(n["layer"]), int(n["node_id"].split("_")[1]))
                               for n in written.nodes if n["feature_type"] == "cross layer transcoder"})
            export_graph_features(self.store, features, self.feature_dir)


def export_graph_features(store, features: list[tuple[int, int]], directory: Path) -> int:
    """Per-feature JSON (``{cantor id}.json``) for the graph's features, for ``scan = ./data/features-<run>``.

    Documents come from the per-feature exporter (``exporters.feature_json.feature_document_bytes``, the
    bytes ``export json`` writes); a feature that never fired in the store gets a stub the viewer can load.
    Existing files are kept (graphs of one run share features). Returns the number of files written.
    """
    from exporters.feature_json import feature_document_bytes

    written = 0
    for layer, feature in features:
        path = directory / f"{cantor(layer, feature)}.json"
        if path.exists():
            continue
        data = feature_document_bytes(store, layer, feature) or _DEAD_FEATURE
        write_bytes_atomic(path, data)
        written += 1
    return written


_DEAD_FEATURE = b'{"isDead":true,"examples_quantiles":[]}'


def _node_rows(slug: str, nodes: list[dict]) -> dict[str, list]:
    columns = {f.name: [] for f in schema.GRAPH_NODES}
    for node in nodes:
        kind = {"cross layer transcoder": "feature", "embedding": "embedding", "logit": "logit"}[node["feature_type"]]
        parts = node["node_id"].split("_")
        is_feature = kind == "feature"
        columns["slug"].append(slug)
        columns["node_id"].append(node["node_id"])
        columns["kind"].append(kind)
        columns["layer"].append(int(parts[0]) if is_feature else None)
        columns["feature"].append(int(parts[1]) if is_feature else None)
        columns["pos"].append(int(node["ctx_idx"]))
        columns["token_id"].append(None if is_feature else int(parts[1]))
        columns["activation"].append(node["activation"])
        columns["influence"].append(node["influence"])
        columns["token_prob"].append(node["token_prob"] if kind == "logit" else None)
        columns["is_target_logit"].append(bool(node["is_target_logit"]))
        columns["clerp"].append(node["clerp"] or None)
    return columns


def _link_rows(slug: str, links: list[dict], nodes: dict[str, dict]) -> dict[str, list]:
    columns = {f.name: [] for f in schema.GRAPH_LINKS}
    for link in links:
        source, target = nodes[link["source"]], nodes[link["target"]]
        columns["slug"].append(slug)
        columns["source"].append(link["source"])
        columns["target"].append(link["target"])
        columns["weight"].append(link["weight"])
        for end, node in (("source", source), ("target", target)):
            columns[f"{end}_kind"].append(node["kind"])
            columns[f"{end}_layer"].append(node["layer"])
            columns[f"{end}_feature"].append(node["feature"])
            columns[f"{end}_pos"].append(node["pos"])
        columns["target_token_id"].append(target["token_id"] if target["kind"] == "logit" else None)
    return columns


def write_graph(store_root, graph: Graph, written, slug: str, *, run_name: str,
                node_threshold: float, edge_threshold: float, prompt_file: str | None = None) -> None:
    """Adjacency first, then nodes and links, then the metadata row that makes the graph visible in ``graphs``."""
    root = store_path(store_root)
    adjacency_file = f"{schema.GRAPH_ADJACENCY_DIR}/{slug}.npz.zst"
    write_bytes_atomic(root / adjacency_file, adjacency_bytes(graph))
    node_columns = _node_rows(slug, written.nodes)
    nodes_table = pa.table(node_columns, schema=schema.GRAPH_NODES)
    by_id = {row["node_id"]: row for row in nodes_table.to_pylist()}
    links_table = pa.table(_link_rows(slug, written.links, by_id), schema=schema.GRAPH_LINKS)
    folders = {name: folder for name, (folder, _) in schema.GRAPH_TABLES.items()}
    write_parquet_atomic(nodes_table, root / folders["graph_nodes"] / f"{slug}.parquet")
    write_parquet_atomic(links_table, root / folders["graph_links"] / f"{slug}.parquet")
    info = graph.info
    meta = {
        "slug": slug, "run_name": run_name, "prompt_file": prompt_file, "prompt": graph.prompt,
        "prompt_tokens": graph.token_strings, "input_token_ids": graph.input_tokens.tolist(),
        "model_name": graph.model_name, "injection": graph.injection, "scan": written.metadata["scan"],
        "node_threshold": node_threshold, "edge_threshold": edge_threshold, "n_active": info.get("n_active", 0),
        "n_feature_rows": graph.n_selected, "n_nodes": len(written.nodes), "n_links": len(written.links),
        "logit_token_ids": graph.logit_tokens.tolist(), "logit_tokens": graph.logit_strings,
        "logit_probabilities": graph.logit_probabilities.tolist(), "top_token_id": graph.top_token,
        "target_token_id": graph.target_token, "target_probability": info.get("target_probability"),
        "target_rank": info.get("target_rank"), "bos_excluded": graph.bos_excluded,
        "adjacency_file": adjacency_file, "created_at": _dt.datetime.now(_dt.timezone.utc),
    }
    table = pa.Table.from_pylist([meta], schema=schema.GRAPH_META)
    write_parquet_atomic(table, root / folders["graphs"] / f"{slug}.parquet")


def load_graph(store_root, slug: str) -> Graph:
    """Rebuild the :class:`Graph` of a stored slug (for notebooks and re-export with other thresholds)."""
    import pyarrow.parquet as pq

    root = store_path(store_root)
    meta_file = root / schema.GRAPH_TABLES["graphs"][0] / f"{slug}.parquet"
    if not meta_file.exists():
        raise UserError(f"no graph {slug!r} in store {root}")
    meta = pq.read_table(io.BytesIO(meta_file.read_bytes())).to_pylist()[0]
    arrays = read_adjacency(root / meta["adjacency_file"])
    return Graph(
        prompt=meta["prompt"], input_tokens=torch.from_numpy(arrays["input_tokens"].astype(np.int64)),
        token_strings=meta["prompt_tokens"],
        active_features=torch.from_numpy(arrays["active_features"].astype(np.int64)),
        activation_values=torch.from_numpy(arrays["activation_values"]),
        selected_features=torch.from_numpy(arrays["selected_features"]),
        adjacency=torch.from_numpy(arrays["adjacency"]),
        logit_tokens=torch.from_numpy(arrays["logit_tokens"].astype(np.int64)), logit_strings=meta["logit_tokens"],
        logit_probabilities=torch.from_numpy(arrays["logit_probabilities"]),
        n_layers=int(arrays["n_layers"]), vocab_size=int(arrays["vocab_size"]), injection=meta["injection"], bos_excluded=meta["bos_excluded"],
        target_token=meta["target_token_id"], model_name=meta["model_name"] or "",
        info={"n_active": meta["n_active"], "target_probability": meta["target_probability"],
              "target_rank": meta["target_rank"]},
    )
