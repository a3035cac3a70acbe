"""Per-feature dashboard documents (the circuit-tracer feature JSON) straight from the store: one feature, all of
them as ``{cantor_id}.json`` files, or streamed into the pack.

The parent process plans blocks of features; with one worker it also scans, renders and compresses them itself,
with a pool each worker process scans its own blocks (cheaper than shipping their rows), renders and compresses
them, and the parent only writes. Workers share the token index through a memory-mapped file and decode each
vocabulary entry once.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from featurestore.errors import UserError
from featurestore.ids import cantor

from .feature_documents import DocumentOptions, Vocabulary, render_block
from .feature_queries import BlockRows, fetch_block, files_of, plan_blocks
from .neuron_examples import check_window_size
from .pack import DEFAULT_LEVEL, PackSummary, pack_entry, parallel_map, write_pack
from .staging import staged_directory
from .token_index import TokenIndex

__all__ = ["DocumentOptions", "feature_document", "feature_document_bytes", "iter_documents", "export_json",
           "export_pack", "JsonSummary"]

POOL_THRESHOLD = 2000  # below this many live features, starting worker processes costs more than it saves


def vocabulary(store) -> Vocabulary:
    cached = getattr(store, "_export_vocabulary", None)
    if cached is None:
        cached = store._export_vocabulary = Vocabulary(store.token_texts())
    return cached


def token_index(store) -> TokenIndex:
    """The whole token index, cached on the store object for as long as its token files do not change."""
    files = tuple(store.manifest_obj.files("tokens"))
    cached = getattr(store, "_export_tokens", None)
    if cached is None or cached[0] != files:
        cached = store._export_tokens = (files, TokenIndex.load(store))
    return cached[1]


# ---- one feature ----

def feature_document_bytes(store, layer: int, feature: int, source: str = "transcoder",
                           options: DocumentOptions | None = None) -> bytes | None:
    """The exact bytes ``export json`` writes for one feature, or None if the feature never fired."""
    options = options or DocumentOptions()
    block = fetch_block(store, source, int(layer), np.array([int(feature)]), options.seed)
    if block is None:
        return None
    cached = getattr(store, "_export_tokens", None)
    tokens = cached[1] if cached and cached[0] == tuple(store.manifest_obj.files("tokens")) else \
        (lambda seqs: TokenIndex.load(store, seqs))
    return next(render_block(block, options, tokens, vocabulary(store)))[1]


def feature_document(store, layer: int, feature: int, source: str = "transcoder",
                     options: DocumentOptions | None = None) -> dict | None:
    """The document ``export json`` writes for one feature (as a dict), or None if it never fired."""
    data = feature_document_bytes(store, layer, feature, source, options)
    return None if data is None else json.loads(data)


# ---- all live features ----

def check_source(store, source: str, layers: list[int] | None) -> list[int]:
    """The layers to export; one-line errors for a store without these activations."""
    collected = store.manifest.get("sources", {}).get(source)
    if not collected or not any(c["source"] == source for c in store.manifest["chunks"]):
        raise UserError(f"{store.path} has no {source} activations; run `featurestore collect` first")
    available = list(collected.get("layers") or range(store.manifest["model"]["n_layers"]))
    missing = [layer for layer in layers or [] if layer not in available]
    if missing:
        raise UserError(f"layers {missing} were not collected for {source} (collected: {available})")
    store.verify(source, layers)  # re-hash what the export reads: corrupt files are never exported
    chosen = available if layers is None else sorted(layers)
    _note_uncompacted(store, source, chosen)
    return chosen


UNCOMPACTED_NOTE_FILES = 8  # activation files per layer above which an export says compaction would help


def _note_uncompacted(store, source: str, layers: list[int]) -> None:
    """Each block of an export reads at least one row group from every file of its layer: with many chunk files
    (``collect --no-compact``, or a collection still running) that is several times the rows it needs."""
    counts = {layer: len(files_of(store, "activations", source, layer)) for layer in layers}
    many = {layer: n for layer, n in counts.items() if n > UNCOMPACTED_NOTE_FILES}
    if many:
        worst = max(many.values())
        print(f"note: {len(many)} layer(s) of {store.path} are not compacted (up to {worst} activation files each), so "
              f"this export reads several times the rows it needs; `featurestore compact {store.path}` merges them once",
              file=sys.stderr)


BLOCKS_PER_WORKER = 4  # a pool cuts each layer into at least this many blocks per worker, so none waits on the last


def _plan(store, source: str, layers: list[int], workers: int = 1) -> list[tuple[int, np.ndarray]]:
    """Blocks of the (checked) layers in pack order: ``BLOCK_ROWS`` each for one process; a pool also wants several
    blocks per worker in every layer (5 blocks on 2 workers take 3 rounds)."""
    min_blocks = BLOCKS_PER_WORKER * workers if workers > 1 else 1
    return [(layer, block) for layer in layers for block in plan_blocks(store, source, layer, min_blocks=min_blocks)]


def iter_documents(store, source: str = "transcoder", options: DocumentOptions | None = None,
                   layers: list[int] | None = None) -> Iterator[tuple[int, int, dict]]:
    """(layer, feature, document) for every live feature in pack order, in this process."""
    options = options or DocumentOptions()
    tokens, vocab = token_index(store), vocabulary(store)
    for layer, features in _plan(store, source, check_source(store, source, layers)):
        block = fetch_block(store, source, layer, features, options.seed)
        if block is not None:
            for feature, data in render_block(block, options, tokens, vocab):
                yield layer, feature, json.loads(data)


_WORKER: dict = {}


def _init_worker(texts: list[str] | None, vocab: Vocabulary | None, tokens_dir: str | None, tokens: TokenIndex | None,
                 store_path: str | None = None) -> None:
    _WORKER["vocab"] = vocab if vocab is not None else Vocabulary(texts)
    _WORKER["tokens"] = tokens if tokens is not None else TokenIndex.open(tokens_dir)
    if store_path is not None:
        import featurestore

        _WORKER["store"] = featurestore.open(store_path)


def _render(task, options: DocumentOptions, mode: str, level: int, out_dir: str | None) -> list:
    """Worker: one block -> files written (mode json) or (layer, feature, pack entry) (mode pack). ``task`` is a
    fetched block, or in a pool (source, layer, features), which the worker reads itself: shipping a block's rows
    between processes costs more than scanning them."""
    block = task if isinstance(task, BlockRows) else fetch_block(_WORKER["store"], *task, options.seed)
    if block is None:
        return []
    results = []
    for feature, data in render_block(block, options, _WORKER["tokens"], _WORKER["vocab"]):
        if mode == "json":
            with open(os.path.join(out_dir, f"{cantor(block.layer, feature)}.json"), "wb") as handle:
                handle.write(data)
            results.append(feature)
        else:
            results.append((block.layer, feature, pack_entry(data, level)))
    return results


def fetched_blocks(store, source: str, plan: list[tuple[int, np.ndarray]], seed: int) -> Iterator[BlockRows]:
    """The plan's non-empty blocks in order. Reading ahead in a thread or a reader process measured no faster on
    2 cores (DuckDB's result conversion holds the GIL; shipping a block costs about what scanning it does)."""
    for layer, features in plan:
        block = fetch_block(store, source, layer, features, seed)
        if block is not None:
            yield block


def _rendered(store, source, options, layers, mode, level, out_dir, workers, progress) -> Iterator[list]:
    from tqdm import tqdm

    plan = _plan(store, source, layers)
    total = sum(len(features) for _, features in plan)
    pool_size = workers or (1 if total < POOL_THRESHOLD else os.cpu_count() or 1)  # workers do the reads too
    if pool_size > 1:
        plan = _plan(store, source, layers, pool_size)  # cheap: a query of feature_stats per layer
    tokens = token_index(store)
    shared = tempfile.mkdtemp(prefix="featurestore-tokens-") if pool_size > 1 else None
    try:
        if shared:
            tokens.save(Path(shared))
            initargs = (store.token_texts(), None, shared, None, str(Path(store.path).resolve()))
            tasks = ((source, layer, features) for layer, features in plan)
        else:
            initargs = (None, vocabulary(store), None, tokens)
            tasks = fetched_blocks(store, source, plan, options.seed)
        with tqdm(total=total, unit="feat", desc=f"export {mode}", disable=not progress, file=sys.stderr) as bar:
            for results in parallel_map(_render, tasks, pool_size, options, mode, level,
                                        out_dir, initializer=_init_worker, initargs=initargs):
                bar.update(len(results))
                yield results
    finally:
        _WORKER.clear()
        if shared:
            shutil.rmtree(shared, ignore_errors=True)


@dataclass
class JsonSummary:
    path: Path
    n_features: int


def _is_feature_json_dir(directory: Path) -> bool:
    return all(p.suffix == ".json" and p.stem.isdigit() for p in directory.iterdir())


def export_json(store, out_dir: str | os.PathLike, *, source: str = "transcoder", options: DocumentOptions | None = None,
                layers: list[int] | None = None, workers: int | None = None, progress: bool = True) -> JsonSummary:
    """Write ``out_dir/features/{cantor_id}.json`` for every live feature (the folder appears whole or not at all)."""
    options = options or DocumentOptions()
    layers = check_source(store, source, layers)
    check_window_size(source, options)  # before any work: neuron windows are as wide as collection stored them
    final = Path(out_dir) / "features"
    count = 0
    with staged_directory(final, replaceable=_is_feature_json_dir) as staging:
        for results in _rendered(store, source, options, layers, "json", DEFAULT_LEVEL, str(staging), workers, progress):
            count += len(results)
    return JsonSummary(final, count)


def pack_shape(store, source: str) -> tuple[list[int], int]:
    """Every model layer (uncollected ones stay empty, so the index covers all) and the units per layer."""
    model = store.manifest["model"]
    n_units = model.get("n_features") if source == "transcoder" else model.get("d_mlp")
    return list(range(int(model["n_layers"]))), int(n_units)


def export_pack(store, out_dir: str | os.PathLike, *, source: str = "transcoder", options: DocumentOptions | None = None,
                layers: list[int] | None = None, dead_stub: bool = False, level: int = DEFAULT_LEVEL,
                workers: int | None = None, progress: bool = True) -> PackSummary:
    """Stream every live feature's document into the circuit-tracer pack; identical bytes on every run."""
    options = options or DocumentOptions()
    layers = check_source(store, source, layers)
    check_window_size(source, options)  # before any work: neuron windows are as wide as collection stored them
    all_layers, n_units = pack_shape(store, source)

    rendered = _rendered(store, source, options, layers, "pack", level, None, workers, progress)
    try:
        entries = (entry for results in rendered for entry in results)
        return write_pack(out_dir, all_layers, n_units, entries, dead_stub=dead_stub, level=level)
    finally:
        rendered.close()  # ends the progress bar (and the pool) before an error is printed
