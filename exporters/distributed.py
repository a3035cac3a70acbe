"""``export json|pack --ray``: one Ray task per layer partition, the same bytes as the single-machine export.

Each task opens the store itself (DuckDB in the task reads only its layer's files), builds that layer's documents
with the exporter's own functions and writes them straight into the output's staging directory: ``{cantor}.json``
files, or ``layer_{L}.bin``. The driver only stages the directory, writes ``index.json.gz`` from the tasks' offsets
and swaps the directory in, so a failed task leaves no half-written output under the final name. The store and the
output directory must be on a filesystem every node sees.
"""
from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

from featurestore.distributed import connect, import_ray
from featurestore.errors import UserError
from featurestore.ids import cantor

from .feature_documents import DocumentOptions, render_block
from .feature_json import JsonSummary, _is_feature_json_dir, check_source, pack_shape, token_index, vocabulary
from .feature_queries import fetch_block, plan_blocks
from .pack import (DEAD_STUB, DEFAULT_LEVEL, INDEX_NAME, PackSummary, _LayerWriters, feature_json_bytes, looks_like_pack,
                   pack_entry)
from .staging import staged_directory


def _open_for_task(store_path: str):
    """The store, its DuckDB limited to the CPUs Ray gave this task (many tasks share a node)."""
    import featurestore as fs
    import ray

    store = fs.open(store_path)
    cpus = max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
    store.con.execute(f"SET threads TO {cpus}")
    return store


def layer_document_bytes(store, source: str, layer: int, options: DocumentOptions):
    """(feature, the exact JSON bytes ``export json`` writes) for every live feature of one layer, in feature order."""
    tokens, vocab = token_index(store), vocabulary(store)
    for features in plan_blocks(store, source, layer):
        block = fetch_block(store, source, layer, features, options.seed)
        if block is not None:
            yield from render_block(block, options, tokens, vocab)


def json_layer_task(store_path: str, source: str, layer: int, options: DocumentOptions, out_dir: str) -> int:
    """Write ``{cantor_id}.json`` for every live feature of one layer; returns how many."""
    store = _open_for_task(store_path)
    count = 0
    for feature, data in layer_document_bytes(store, source, layer, options):
        with open(os.path.join(out_dir, f"{cantor(layer, feature)}.json"), "wb") as handle:
            handle.write(data)
        count += 1
    return count


def pack_layer_task(store_path: str | None, source: str, layer: int, options: DocumentOptions, out_dir: str,
                    n_features: int, dead_stub: bool, level: int) -> dict:
    """Write ``layer_{L}.bin`` of one layer (all dead when ``store_path`` is None: a layer not exported);
    returns its index entry and counts."""
    stub = pack_entry(feature_json_bytes(DEAD_STUB), level) if dead_stub else b""
    summary = PackSummary(Path(out_dir), [layer], n_features)
    writers = _LayerWriters(Path(out_dir), [layer], n_features, stub, summary)
    if store_path is not None:
        store = _open_for_task(store_path)
        for feature, data in layer_document_bytes(store, source, layer, options):
            writers.add(layer, feature, pack_entry(data, level))
    index = writers.finish()
    return {"index": index[str(layer)], "entries": summary.entries, "dead": summary.dead, "bytes": summary.bytes_written}


def _run_tasks(function, calls: list[tuple], address: str, what: str, progress: bool) -> list:
    """One Ray task per call, results in call order; a failed task fails the export with its one-line cause."""
    from tqdm import tqdm

    ray = import_ray(loopback=address == "local")
    started = connect(ray, address)
    remote = ray.remote(function).options(num_cpus=1, max_retries=2)
    try:
        refs = [remote.remote(*call) for call in calls]
        results: dict = {}
        with tqdm(total=len(refs), unit="layer", desc=what, disable=not progress, file=sys.stderr) as bar:
            pending = list(refs)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                try:
                    results[ready[0]] = ray.get(ready[0])
                except ray.exceptions.RayError as exc:
                    for ref in pending:
                        ray.cancel(ref, force=True)
                    cause = getattr(exc, "cause", None) or exc
                    raise UserError(f"{what} failed in a Ray task: {str(cause).splitlines()[0]}") from None
                bar.update(1)
        return [results[ref] for ref in refs]
    finally:
        if started:
            ray.shutdown()


def export_json_distributed(store, out_dir: str | os.PathLike, *, source: str = "transcoder",
                            options: DocumentOptions | None = None, layers: list[int] | None = None,
                            address: str = "local", progress: bool = True) -> JsonSummary:
    """``export_json`` with one Ray task per layer: ``out_dir/features/{cantor_id}.json``, the same bytes."""
    options = options or DocumentOptions()
    layers = check_source(store, source, layers)
    final = Path(out_dir) / "features"
    with staged_directory(final, replaceable=_is_feature_json_dir) as staging:
        calls = [(str(store.path), source, layer, options, str(staging)) for layer in layers]
        counts = _run_tasks(json_layer_task, calls, address, "export json", progress)
    return JsonSummary(final, sum(counts))


def export_pack_distributed(store, out_dir: str | os.PathLike, *, source: str = "transcoder",
                            options: DocumentOptions | None = None, layers: list[int] | None = None,
                            dead_stub: bool = False, level: int = DEFAULT_LEVEL, address: str = "local",
                            progress: bool = True) -> PackSummary:
    """``export_pack`` with one Ray task per layer; the pack is byte-identical to the single-machine one."""
    options = options or DocumentOptions()
    exported = set(check_source(store, source, layers))
    all_layers, n_features = pack_shape(store, source)
    with staged_directory(out_dir, replaceable=looks_like_pack) as staging:
        calls = [(str(store.path) if layer in exported else None, source, layer, options, str(staging), n_features,
                  dead_stub, level) for layer in all_layers]
        results = _run_tasks(pack_layer_task, calls, address, "export pack", progress)
        index: dict = {"version": "1.0", "format": "variable_chunks"}
        summary = PackSummary(Path(out_dir), list(all_layers), n_features)
        for layer, result in zip(all_layers, results):
            index[str(layer)] = result["index"]
            summary.entries += result["entries"]
            summary.dead += result["dead"]
            summary.bytes_written += result["bytes"]
            summary.per_layer_bytes[layer] = result["bytes"]
        (staging / INDEX_NAME).write_bytes(gzip.compress(json.dumps(index).encode("utf-8"), 9, mtime=0))
    return summary
