"""The circuit-tracer packed feature format (``variable_chunks``): deterministic writer and JSON-directory packer.

Layout (what the viewer's binary reader expects): per layer ``layer_{L}.bin``, the concatenation in feature order
of ``uint32 LE length + gzip(compact JSON)``, and ``index.json.gz`` =
``{"version":"1.0","format":"variable_chunks","<L>":{"filename":"layer_<L>.bin","offsets":[n_features+1]}}``.
A feature without an entry keeps equal offsets (the original layout) unless ``dead_stub`` asks for a small valid
entry, since the viewer throws on a zero-length entry. Output bytes depend only on the documents and the level
(gzip ``mtime=0``, fixed key order, compact separators, ``ensure_ascii``).
"""
from __future__ import annotations

import gzip
import json
import os
import re
import struct
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from featurestore.errors import UserError
from featurestore.ids import cantor_unpair

from .pack_reader import PackReader, read_feature  # noqa: F401  (re-exported: exporters.pack.read_feature)
from .staging import staged_directory

DEFAULT_LEVEL = 6
INDEX_NAME = "index.json.gz"
DEAD_STUB = {"isDead": True, "examples_quantiles": [], "top_logits": [], "bottom_logits": [],
             "act_min": 0.0, "act_max": 0.0, "activation_frequency": 0.0}
_LENGTH = struct.Struct("<I")


def layer_filename(layer: int) -> str:
    return f"layer_{layer}.bin"


def feature_json_bytes(document: dict) -> bytes:
    """The one serialisation used everywhere (files, pack, to_json round trips): compact, ASCII, no NaN."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def pack_entry(json_bytes: bytes, level: int = DEFAULT_LEVEL) -> bytes:
    """``uint32 LE length + gzip`` for one feature; gzip ``mtime=0`` so equal input gives equal bytes."""
    payload = gzip.compress(json_bytes, compresslevel=level, mtime=0)
    return _LENGTH.pack(len(payload)) + payload


def looks_like_pack(directory: Path) -> bool:
    return (directory / INDEX_NAME).is_file()


@dataclass
class PackSummary:
    path: Path
    layers: list[int]
    n_features: int
    entries: int = 0
    dead: int = 0
    bytes_written: int = 0
    per_layer_bytes: dict[int, int] = field(default_factory=dict)


def write_pack(out_dir: str | os.PathLike, layers: Sequence[int], n_features: int,
               entries: Iterable[tuple[int, int, bytes]], *, dead_stub: bool = False,
               level: int = DEFAULT_LEVEL) -> PackSummary:
    """Write a pack from ``(layer, feature, pack_entry bytes)`` arriving in (layer, feature) order.

    Features missing from ``entries`` are dead: equal offsets, or the stub entry with ``dead_stub``. The pack is
    built in a temporary sibling directory and renamed to ``out_dir`` only when complete.
    """
    layers = sorted(int(layer) for layer in layers)
    stub = pack_entry(feature_json_bytes(DEAD_STUB), level) if dead_stub else b""
    with staged_directory(out_dir, replaceable=looks_like_pack) as staging:
        summary = PackSummary(Path(out_dir), layers, n_features)
        writers = _LayerWriters(staging, layers, n_features, stub, summary)
        for layer, feature, entry in entries:
            writers.add(layer, feature, entry)
        index = writers.finish()
        (staging / INDEX_NAME).write_bytes(gzip.compress(json.dumps(index).encode("utf-8"), 9, mtime=0))
    return summary


class _LayerWriters:
    """Appends entries to one open layer file at a time, filling gaps with dead entries."""

    def __init__(self, directory: Path, layers: list[int], n_features: int, stub: bytes, summary: PackSummary):
        self.directory, self.layers, self.n_features, self.stub, self.summary = directory, layers, n_features, stub, summary
        self.index: dict = {"version": "1.0", "format": "variable_chunks"}
        self.pending = iter(layers)
        self.layer: int | None = None
        self.handle = None
        self.offsets: list[int] = []

    def add(self, layer: int, feature: int, entry: bytes) -> None:
        if layer != self.layer:
            if self.layer is not None and layer < self.layer:
                raise ValueError(f"pack entries out of order: layer {layer} after layer {self.layer}")
            self._advance_to(layer)
        if not 0 <= feature < self.n_features:
            raise ValueError(f"feature {feature} outside 0..{self.n_features - 1} in layer {layer}")
        if feature < len(self.offsets) - 1:
            raise ValueError(f"pack entries out of order: layer {layer} feature {feature} repeated or decreasing")
        self._fill_dead(feature)
        self._write(entry)
        self.summary.entries += 1

    def finish(self) -> dict:
        self._advance_to(None)
        return self.index

    def _advance_to(self, layer: int | None) -> None:
        if self.handle is not None:
            self._close_current()
        for next_layer in self.pending:
            self._open(next_layer)
            if next_layer == layer:
                return
            self._close_current()
        if layer is not None:
            raise ValueError(f"layer {layer} is not one of the pack's layers {self.layers}")

    def _open(self, layer: int) -> None:
        self.layer = layer
        self.handle = open(self.directory / layer_filename(layer), "wb")
        self.offsets = [0]

    def _write(self, entry: bytes) -> None:
        self.handle.write(entry)
        self.offsets.append(self.offsets[-1] + len(entry))

    def _fill_dead(self, upto: int) -> None:
        while len(self.offsets) - 1 < upto:
            self._write(self.stub)
            self.summary.dead += 1

    def _close_current(self) -> None:
        self._fill_dead(self.n_features)
        self.handle.close()
        self.handle = None
        self.index[str(self.layer)] = {"filename": layer_filename(self.layer), "offsets": self.offsets}
        self.summary.per_layer_bytes[self.layer] = self.offsets[-1]
        self.summary.bytes_written += self.offsets[-1]


# ---- packing an existing per-feature JSON directory (the original workflow) ----

_ID_FILE = re.compile(r"^(\d+)\.json$")


def _scan_json_dir(json_dir: Path) -> list[tuple[int, int, Path]]:
    if not json_dir.is_dir():
        raise UserError(f"{json_dir} is not a directory of per-feature JSON files")
    found = []
    for entry in os.scandir(json_dir):
        match = _ID_FILE.match(entry.name)
        if match and entry.is_file():
            layer, feature = cantor_unpair(int(match.group(1)))
            found.append((layer, feature, Path(entry.path)))
    if not found:
        raise UserError(f"{json_dir} holds no {{cantor_id}}.json files")
    found.sort()
    return found


def _normalise_files(batch: list[tuple[int, int, str]], level: int) -> list[tuple[int, int, bytes]]:
    """Worker: parse each file and re-serialise it canonically, so the pack does not depend on input spacing."""
    out = []
    for layer, feature, path in batch:
        with open(path, "rb") as handle:
            try:
                document = json.loads(handle.read())
            except ValueError as exc:
                raise UserError(f"{path} is not valid JSON: {exc}") from None
        out.append((layer, feature, pack_entry(feature_json_bytes(document), level)))
    return out


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def resolve_workers(workers: int | None) -> int:
    """Default: one process per core but one, which the parent needs for reading the store and writing output."""
    return max(1, workers if workers else (os.cpu_count() or 1) - 1)


_PRELOAD = ["exporters.pack", "exporters.integrity", "exporters.feature_json"]


def _pool_context():
    """A fork server: started once per process from a clean interpreter (never forking a parent that runs DuckDB
    threads), it imports the exporters once, and each worker forks from it in milliseconds."""
    context = get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def parallel_map(function, batches: Iterable, workers: int, *args, initializer=None, initargs=()) -> Iterator:
    """Ordered map over a process pool (or inline for one worker); yields results as the writer needs them."""
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for batch in batches:
            yield function(batch, *args)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_pool_context(), initializer=initializer, initargs=initargs)
    try:
        pending = []
        for batch in batches:
            pending.append(pool.submit(function, batch, *args))
            if len(pending) >= 2 * workers:  # bounded read-ahead keeps memory flat on big exports
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pack_json_dir(json_dir: str | os.PathLike, out_dir: str | os.PathLike, *, n_layers: int | None = None,
                  n_features: int | None = None, dead_stub: bool = False, level: int = DEFAULT_LEVEL,
                  workers: int | None = None, progress: bool = True) -> PackSummary:
    """Pack ``json_dir/{cantor_id}.json`` files. Without ``n_layers``/``n_features`` they are inferred from the
    largest ids present, which undercounts when the last features never fired: pass them when known."""
    from tqdm import tqdm

    files = _scan_json_dir(Path(json_dir))
    max_layer = max(layer for layer, _, _ in files)
    max_feature = max(feature for _, feature, _ in files)
    n_layers = n_layers if n_layers is not None else max_layer + 1
    n_features = n_features if n_features is not None else max_feature + 1
    if max_layer >= n_layers or max_feature >= n_features:
        raise UserError(f"{json_dir} holds layer {max_layer} / feature {max_feature}, beyond --n-layers {n_layers} / --n-features {n_features}")
    work = [(layer, feature, str(path)) for layer, feature, path in files]
    bar = tqdm(total=len(work), unit="feat", desc="pack", disable=not progress, file=sys.stderr)

    def entries():
        # process start-up outweighs small jobs, unless the caller asked for a pool size
        pool_size = workers or (1 if len(work) < 2000 else resolve_workers(None))
        for results in parallel_map(_normalise_files, batched(work, 256), pool_size, level):
            yield from results
            bar.update(len(results))

    try:
        return write_pack(out_dir, range(n_layers), n_features, entries(), dead_stub=dead_stub, level=level)
    finally:
        bar.close()
