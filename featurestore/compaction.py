"""Compaction: each (source, layer)'s chunk files merged into a few large files sorted by (feature, seq_id, pos).

Per-feature reads open every file of a layer, so they slow down as chunks accumulate; after compaction a layer
is one file per ``FILE_ROWS`` rows whose row groups each hold a whole range of features (a feature larger than a
group gets groups of its own), and its ``feature_stats`` is one row per feature.

Streaming, memory bounded: one pass reads the ``feature`` column to plan feature ranges of ``GROUP_ROWS`` rows;
the merge keeps one cursor per input file and reads each input row group once, holding at most one row group per
file plus the range being written, for each layer in flight (up to 4 at once). Input hashes are verified first
(compaction must not launder a damaged file into a freshly hashed one).

Crash safety: new files get names of a new generation (``compact-gNNNN-MMM.parquet``) and are invisible until one
atomic manifest rewrite per layer replaces the layer's file lists; the old files are deleted only after it. A kill
before the rewrite leaves the old files in force, after it the new ones; a rerun (of ``compact`` or ``collect``)
deletes the unlisted leftovers and carries on with the next layer. Chunks committed later stay separate files,
readable alongside the compacted ones, until the next compaction merges them in.
"""
from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from . import checks, schema
from .manifest import Manifest, writer_lock
from .storage import HashingFile, _fsync_dir, is_remote, open_parquet, store_path, temp_path, write_parquet_atomic

GROUP_ROWS = 1 << 16  # rows per row group: a range of whole features (a bigger feature spans several groups)
FILE_ROWS = 1 << 26  # rows per compacted file (~0.5 GB)
MAX_FEATURE = (1 << 31) - 1  # feature ids are int32: the last range ends here
SORT_KEYS = [("feature", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")]


def compact(location, progress: bool = True) -> dict:
    """``featurestore compact``: take the writer lock and compact every layer that has chunk files."""
    root = store_path(location)
    with writer_lock(root):
        return compact_locked(Manifest.load(root), progress)


def compact_locked(manifest: Manifest, progress: bool = True, workers: int | None = None) -> dict:
    """Compact a store whose writer lock the caller holds, ``workers`` layers at a time (Arrow, zstd and the sort
    release the GIL), then the tokens files (``tokens_compaction``); returns {"layers": n compacted, "rows": n rows,
    "tokens_files": n tokens files merged}."""
    checks.quick_check(manifest, progress)
    jobs = []
    for source in manifest.sources():
        for layer in _layers(manifest, source):
            _remove_unlisted(manifest, source, layer)
            if _needs_compaction(manifest, source, layer):
                jobs.append((source, layer, _layer_files(manifest, "activations", source, layer),
                             _layer_files(manifest, "feature_stats", source, layer)))
    total = sum(open_parquet(manifest.root / rel).metadata.num_rows for job in jobs for rel in job[2])
    bar = tqdm(total=total, unit="row", unit_scale=True, desc="compact", disable=not progress or not jobs, file=sys.stderr)
    lock = threading.Lock()
    try:
        with ThreadPoolExecutor(max(1, workers or min(4, os.cpu_count() or 1))) as pool:
            rows = list(pool.map(lambda job: compact_layer(manifest, *job, bar=bar, lock=lock), jobs))
    finally:
        bar.close()
    from . import tokens_compaction  # imports this module's Output

    tokens_compaction.remove_unlisted(manifest)
    merged = tokens_compaction.compact_tokens(manifest) if tokens_compaction.needs_compaction(manifest) else 0
    return {"layers": len(jobs), "rows": sum(rows), "tokens_files": merged}


def _layers(manifest: Manifest, source: str) -> list[int]:
    layers = set(int(x) for x in manifest.data.get("compacted", {}).get(source, {}))
    for rel in manifest.files("activations", source) + manifest.files("feature_stats", source):
        layers.add(_layer_of(rel))
    return sorted(layers)


def _layer_of(rel: str) -> int:
    return int(rel.split("/layer=", 1)[1].split("/", 1)[0])


def _layer_files(manifest: Manifest, table: str, source: str, layer: int) -> list[str]:
    prefix = schema.partition_dir(table, source, layer) + "/"
    return [rel for rel in manifest.files(table, source) if rel.startswith(prefix)]


def _needs_compaction(manifest: Manifest, source: str, layer: int) -> bool:
    entry = manifest.data.get("compacted", {}).get(source, {}).get(str(layer))
    done = set(entry["activations"] + entry["feature_stats"]) if entry else set()
    current = _layer_files(manifest, "activations", source, layer) + _layer_files(manifest, "feature_stats", source, layer)
    return bool(current) and not set(current) <= done


def _remove_unlisted(manifest: Manifest, source: str, layer: int) -> None:
    """Leftovers of a killed compaction (new files never committed, or old ones not yet deleted)."""
    listed = set(manifest.listed())
    for table in ("activations", "feature_stats"):
        directory = manifest.root / schema.partition_dir(table, source, layer)
        for path in directory.glob("*"):
            if path.relative_to(manifest.root).as_posix() not in listed and path.is_file():
                path.unlink(missing_ok=True)


def compact_layer(manifest: Manifest, source: str, layer: int, inputs: list[str], stats_inputs: list[str], *, bar,
                  lock: threading.Lock) -> int:
    """Merge one layer's files (``inputs``: activations, ``stats_inputs``: feature_stats) and commit the result."""
    root = manifest.root
    checks.verify_files(manifest, inputs + stats_inputs, progress=False)
    with lock:
        entry = manifest.data.get("compacted", {}).get(source, {}).get(str(layer)) or {}
    generation = int(entry.get("generation", 0)) + 1
    directory = schema.partition_dir("activations", source, layer)
    hashes: dict[str, list] = {}

    stats = _merged_stats(root, stats_inputs)
    counts = _planning_counts(root, source, inputs, stats)
    outputs, rows = [], 0
    writer = Output(root, f"{directory}/compact-g{generation:04d}", hashes)
    try:
        cursors = [_Cursor(open_parquet(root / rel)) for rel in inputs]
        for lo, hi in feature_ranges(counts, GROUP_ROWS):
            pieces = [piece for cursor in cursors if (piece := cursor.take_below(lo, hi)) is not None]
            if pieces:
                # one piece is one file's run, already in (feature, seq_id, pos) order
                group = pieces[0] if len(pieces) == 1 else sort_rows(pa.concat_tables(pieces))
                writer.write(group)
                bar.update(group.num_rows)
                rows += group.num_rows
        outputs = writer.close()
    finally:
        writer.abort()

    stats_rel = f"{schema.partition_dir('feature_stats', source, layer)}/compact-g{generation:04d}.parquet"
    info = {}
    write_parquet_atomic(stats, root / stats_rel, info=info)
    hashes[stats_rel] = [info["size"], info["sha256"]]

    old = set(inputs + stats_inputs)
    with lock:
        _commit(manifest, source, layer, {"generation": generation, "activations": outputs, "feature_stats": [stats_rel]},
                old, hashes)
    for rel in sorted(old):
        (root / rel).unlink(missing_ok=True)
    return rows


def _commit(manifest: Manifest, source: str, layer: int, entry: dict, old: set[str], hashes: dict) -> None:
    """One atomic manifest rewrite: the layer's new files in, its old files (chunk and compacted) out."""
    data = manifest.data
    chunks = set()
    for record in manifest.chunks:
        for table in ("activations", "feature_stats"):
            kept = [rel for rel in record["files"].get(table, []) if rel not in old]
            if len(kept) != len(record["files"].get(table, [])):
                chunks.add(record["chunk"])
                record["files"][table] = kept
        for rel in old & set(record.get("hashes", {})):
            del record["hashes"][rel]
    previous = data.setdefault("compacted", {}).setdefault(source, {}).get(str(layer)) or {}
    entry["chunks"] = sorted(set(previous.get("chunks", [])) | chunks)
    data["compacted"][source][str(layer)] = entry
    table_hashes = data.setdefault("hashes", {})
    for rel in old & set(table_hashes):
        del table_hashes[rel]
    table_hashes.update(hashes)
    manifest.save()
    checks.remember(manifest, hashes)


def feature_ranges(counts: np.ndarray, group_rows: int) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) feature ranges of about ``group_rows`` rows each (a bigger feature is a range alone),
    from 0 to past any feature id, so that every row falls in one even where ``counts`` only estimates."""
    live = np.flatnonzero(counts)
    ranges, start, total = [], 0, 0
    for feature in live:
        n = int(counts[feature])
        if total and total + n > group_rows:
            ranges.append((start, int(feature)))
            start, total = int(feature), 0
        total += n
    ranges.append((start, MAX_FEATURE))
    return ranges


def sort_rows(table: pa.Table) -> pa.Table:
    """Rows sorted by (feature, seq_id, pos): one packed 64-bit key when it fits (the input is a concatenation of
    sorted runs, which a stable sort merges fast), else Arrow's multi-key sort."""
    if table.num_rows == 0:
        return table
    feature = table.column("feature").to_numpy().astype(np.int64)
    seq = table.column("seq_id").to_numpy().astype(np.uint64)
    pos = table.column("pos").to_numpy().astype(np.uint64)
    lowest = int(feature.min())
    if int(feature.max()) - lowest >= 1 << 13 or seq.max() >= 1 << 31 or pos.max() >= 1 << 20:
        return table.sort_by(SORT_KEYS)
    rank = (feature - lowest).astype(np.uint64)
    return table.take(np.argsort((rank << np.uint64(51)) | (seq << np.uint64(20)) | pos, kind="stable"))


def _planning_counts(root, source: str, inputs: list[str], stats: pa.Table) -> np.ndarray:
    """Rows per feature, to cut the layer into row groups. Transcoder statistics count exactly the stored rows, so
    they save a read of the ``feature`` column; neuron statistics count every positive activation, more than the
    stored rows, so neurons count the column itself."""
    if source != "transcoder":
        return _feature_counts(root, inputs)
    counts = np.zeros(int(pc.max(stats.column("feature")).as_py() or 0) + 1 if stats.num_rows else 0, np.int64)
    counts[stats.column("feature").to_numpy()] = stats.column("n_active").to_numpy()
    return counts


def _feature_counts(root, inputs: list[str]) -> np.ndarray:
    counts = np.zeros(0, np.int64)
    for rel in inputs:
        column = open_parquet(root / rel).read(columns=["feature"]).column(0).to_numpy()
        if len(column):
            found = np.bincount(column.astype(np.int64))
            if len(found) > len(counts):
                counts = np.pad(counts, (0, len(found) - len(counts)))
            counts[: len(found)] += found
    return counts


class _Cursor:
    """One input file read in order, one row group at a time; rows not yet taken wait in ``buffer``."""

    def __init__(self, file: pq.ParquetFile):
        self.file = file
        meta = file.metadata
        index = file.schema_arrow.get_field_index("feature")
        self.mins = []
        for i in range(meta.num_row_groups):
            stats = meta.row_group(i).column(index).statistics
            self.mins.append(stats.min if stats is not None and stats.has_min_max else -1)
        self.next = 0
        self.buffer: pa.Table | None = None

    def take_below(self, lo: int, hi: int) -> pa.Table | None:
        """Rows with feature < hi (the file is sorted by feature; rows below lo were taken by earlier ranges)."""
        parts = [self.buffer] if self.buffer is not None else []
        while self.next < len(self.mins) and self.mins[self.next] < hi:
            parts.append(self.file.read_row_group(self.next))
            self.next += 1
        if not parts:
            return None
        table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
        split = int(np.searchsorted(table.column("feature").to_numpy(), hi, side="left"))
        self.buffer = table.slice(split) if split < table.num_rows else None
        return table.slice(0, split) if split else None


class Output:
    """Compacted files of a table (activations: one row group per feature range, a new file every ``FILE_ROWS``
    rows; ``file_rows=None``: one file); each written under a temporary name (or one object-store upload) and hashed
    while written."""

    def __init__(self, root, stem: str, hashes: dict, table_schema: pa.Schema = schema.ACTIVATIONS,
                 options: dict | None = None, group_rows: int = GROUP_ROWS, file_rows: int | None = FILE_ROWS):
        self.root, self.stem, self.hashes = root, stem, hashes
        self.table_schema, self.options = table_schema, options if options is not None else schema.ACTIVATION_PARQUET
        self.group_rows, self.file_rows = group_rows, file_rows
        self.files: list[str] = []
        self.writer = self.handle = self.sink = self.tmp = None
        self.rows = 0

    def write(self, group: pa.Table) -> None:
        if self.writer is None or (self.file_rows is not None and self.rows >= self.file_rows):
            self._finish()
            self._start()
        self.writer.write_table(group, row_group_size=self.group_rows)
        self.rows += group.num_rows

    def _start(self) -> None:
        rel = f"{self.stem}-{len(self.files):03d}.parquet"
        path = self.root / rel
        if is_remote(path):
            self.handle = path.filesystem.open_output_stream(path.key)
        else:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.tmp = temp_path(Path(path))
            self.handle = open(self.tmp, "wb")
        self.sink = HashingFile(self.handle)
        self.writer = pq.ParquetWriter(self.sink, self.table_schema, **self.options)
        self.files.append(rel)
        self.rows = 0

    def _finish(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        if self.tmp is not None:
            self.handle.flush()
            os.fsync(self.handle.fileno())
        self.handle.close()
        rel = self.files[-1]
        if self.tmp is not None:
            os.replace(self.tmp, self.root / rel)
            _fsync_dir(Path(self.root / rel).parent)
        self.hashes[rel] = [self.sink.size, self.sink.digest.hexdigest()]
        self.writer = self.handle = self.tmp = None

    def close(self) -> list[str]:
        self._finish()
        return list(self.files)

    def abort(self) -> None:
        """After an error: drop the half-written file (committed ones stay unlisted, removed by the next run)."""
        if self.handle is not None:
            self.handle.close()
            if self.tmp is not None:
                self.tmp.unlink(missing_ok=True)
            self.writer = self.handle = self.tmp = None


def _merged_stats(root, inputs: list[str]) -> pa.Table:
    """One row per live feature: counts and sums added and maxima taken over the inputs, in input order."""
    size = 0
    n_active = sum_act = max_act = None
    for rel in inputs:
        table = open_parquet(root / rel).read()
        feature = table.column("feature").to_numpy().astype(np.int64)
        if not len(feature):
            continue
        if feature.max() + 1 > size:
            grow = int(feature.max()) + 1 - size
            n_active = np.pad(n_active, (0, grow)) if n_active is not None else np.zeros(grow, np.int64)
            sum_act = np.pad(sum_act, (0, grow)) if sum_act is not None else np.zeros(grow, np.float64)
            max_act = np.pad(max_act, (0, grow), constant_values=-np.inf) if max_act is not None else np.full(grow, -np.inf, np.float32)
            size = len(n_active)
        np.add.at(n_active, feature, table.column("n_active").to_numpy())
        np.add.at(sum_act, feature, table.column("sum_act").to_numpy())
        np.maximum.at(max_act, feature, table.column("max_act").to_numpy())
    if n_active is None:
        return schema.empty_table(schema.FEATURE_STATS)
    live = np.flatnonzero(n_active)
    return pa.table({"feature": live.astype(np.int32), "n_active": n_active[live], "sum_act": sum_act[live],
                     "max_act": max_act[live].astype(np.float32)}, schema=schema.FEATURE_STATS)
