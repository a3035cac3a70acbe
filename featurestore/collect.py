"""Collection: run a model over a dataset and commit every activation into the store, chunk by chunk.

A chunk is a fixed range of dataset rows (``chunk_size``), the unit of commit and of resume. Its files are
written by a background thread while the next chunk's forward passes run; they become visible only when the
manifest records the chunk, so an interrupted run resumes with exactly the rows an uninterrupted one writes.
"""
from __future__ import annotations

import contextlib
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import schema
from .capture import Capture, NeuronCapture, StopForward, TranscoderCapture, sample_neurons
from .data import FORMATS, Dataset, adds_special_tokens, format_text, open_dataset
from .errors import UserError
from .logit_lens import logit_lens_table, neuron_directions, transcoder_directions
from .manifest import DATA_KEYS, Manifest, is_store, now, writer_lock
from .modeling import default_device, load_model, load_tokenizer, parse_dtype, weights_fingerprint
from .regions import REGION_CODE, MarkerIds, assign_regions, find_markers
from .storage import write_parquet_atomic
from .vocab import build_vocab

REGION_DICTIONARY = pa.array(schema.REGIONS, pa.string())


@dataclass
class CollectOptions:
    format: str = "deepseek"
    max_length: int = 10000
    max_samples: int | None = None
    layers: list[int] | None = None
    dtype: str = "auto"
    device: str | None = None
    batch_tokens: int = 16384
    skip_incomplete: bool = False
    source: str = "transcoder"
    neurons_per_layer: int = 500
    seed: int = 0
    chunk_size: int = 64
    tokenizer: str | None = None
    revision: str | None = None
    flush_rows: int = 4_000_000
    progress: bool = True
    # test hook: stop (as if killed) after this many chunks were committed in this run
    stop_after_chunks: int | None = field(default=None, repr=False)


def parse_layers(spec: str | None) -> list[int] | None:
    """``"0,3,5-7"`` → [0, 3, 5, 6, 7]; None or "all" → None (every layer)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    layers: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
        except ValueError:
            raise UserError(f"bad --layers {spec!r}: use e.g. 0,3,5-7") from None
    return sorted(layers)


@dataclass
class Tokenized:
    seq_ids: list[int]
    ids: list[np.ndarray]
    sequences: pa.Table
    tokens: pa.Table
    n_skipped: int


def tokenize_chunk(rows, tokenizer, opts: CollectOptions, markers: MarkerIds) -> Tokenized:
    rows = list(rows)
    texts = [format_text(row, opts.format, tokenizer) for row in rows]
    encoded = tokenizer(texts, add_special_tokens=adds_special_tokens(opts.format))["input_ids"] if texts else []
    seq_ids, ids_out, seq_cols, tok_parts = [], [], {name: [] for name in schema.SEQUENCES.names}, []
    skipped = 0
    for row, ids in zip(rows, encoded):
        ids = np.asarray(ids, dtype=np.int32)
        truncated = len(ids) > opts.max_length
        ids = ids[: opts.max_length]
        found = find_markers(ids, markers)
        complete = found["think_start"] is not None and found["think_end"] is not None
        if opts.skip_incomplete and not complete:
            skipped += 1
            continue
        if len(ids) == 0:
            skipped += 1
            continue
        region, thinking_pos = assign_regions(len(ids), found)
        seq_ids.append(row.row_index)
        ids_out.append(ids)
        values = dict(seq_id=row.row_index, domain=row.domain, source=row.source, n_tokens=len(ids),
                      truncated=truncated, complete=complete, **found)
        for name in schema.SEQUENCES.names:
            seq_cols[name].append(values[name])
        n = len(ids)
        tok_parts.append((np.full(n, row.row_index, np.int32), np.arange(n, dtype=np.int32), ids, region, thinking_pos))
    if tok_parts:
        cols = [np.concatenate([p[i] for p in tok_parts]) for i in range(5)]
    else:
        cols = [np.zeros(0, np.int32)] * 3 + [np.zeros(0, np.int8), np.zeros(0, np.float32)]
    tokens = pa.table({
        "seq_id": cols[0], "pos": cols[1], "token_id": cols[2],
        "region": pa.DictionaryArray.from_arrays(pa.array(cols[3], pa.int8()), REGION_DICTIONARY),
        "thinking_pos": pa.array(cols[4], pa.float32(), from_pandas=True),  # NaN → null
    }, schema=schema.TOKENS)
    return Tokenized(seq_ids, ids_out, pa.table(seq_cols, schema=schema.SEQUENCES), tokens, skipped)


def plan_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped longest first so that (batch size × longest length) stays within ``batch_tokens``."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def run_batch(net, ids: list[np.ndarray], seq_ids: list[int], pad_id: int, device, capture: Capture | None) -> None:
    """One padded forward pass through the decoder stack (no LM head), feeding ``capture``'s hooks."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.from_numpy(x.astype(np.int64))
        mask[row, : len(x)] = 1
    input_ids, mask = input_ids.to(device), mask.to(device)
    if capture is not None:
        capture.set_batch(torch.as_tensor(seq_ids, dtype=torch.int32, device=device), mask.bool())
    with torch.inference_mode():
        try:
            net.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
        except StopForward:
            pass


class ChunkWriter:
    """Writes a chunk's files on a background thread and commits it; at most one chunk is in flight."""

    def __init__(self, manifest: Manifest, source: str, unit_ids: dict[int, np.ndarray]):
        self.manifest = manifest
        self.source = source
        self.unit_ids = unit_ids
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurestore-writer")
        self.pending: list[Future] = []

    def _wait(self, keep: int) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()

    def submit(self, fn, *args) -> Future:
        self._wait(keep=1)
        future = self.pool.submit(fn, *args)
        self.pending.append(future)
        return future

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                self._wait(keep=0)
        finally:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)

    def clear_stale(self, chunk: int, with_tokens: bool) -> None:
        """Remove files an interrupted run left for this uncommitted chunk."""
        root = self.manifest.root
        pattern = f"chunk-{chunk:06d}*.parquet"
        for table in ("activations", "feature_stats"):
            for path in (root / table / f"source={self.source}").glob(f"layer=*/{pattern}"):
                path.unlink()
        if with_tokens:
            for table in ("tokens", "sequences"):
                for path in (root / table).glob(pattern):
                    path.unlink()

    def write_part(self, chunk: int, layer: int, part: int, rows) -> str:
        feature, seq_id, pos, act = rows
        table = pa.table({"feature": self.unit_ids[layer][feature].astype(np.int32), "seq_id": seq_id, "pos": pos, "act": act},
                         schema=schema.ACTIVATIONS)
        table = table.sort_by([("feature", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")])
        rel = f"{schema.partition_dir('activations', self.source, layer)}/{schema.chunk_name(chunk, part)}"
        write_parquet_atomic(table, self.manifest.root / rel)
        return rel

    def write_stats(self, chunk: int, layer: int, stats) -> str:
        count, total, peak = stats
        live = np.flatnonzero(count)
        table = pa.table({"feature": self.unit_ids[layer][live].astype(np.int32), "n_active": count[live],
                          "sum_act": total[live], "max_act": peak[live]}, schema=schema.FEATURE_STATS)
        rel = f"{schema.partition_dir('feature_stats', self.source, layer)}/{schema.chunk_name(chunk)}"
        write_parquet_atomic(table, self.manifest.root / rel)
        return rel

    def write_chunk(self, record: dict, part_futures: list[Future], tables: dict[str, pa.Table], stats: dict) -> None:
        files = record["files"]
        files["activations"] = [f.result() for f in part_futures]
        files["feature_stats"] = [self.write_stats(record["chunk"], layer, s) for layer, s in sorted(stats.items())]
        for name, table in tables.items():
            rel = f"{name}/{schema.chunk_name(record['chunk'])}"
            write_parquet_atomic(table, self.manifest.root / rel)
            files[name] = [rel]
        record["committed"] = now()
        self.manifest.commit_chunk(record)


def _make_capture(net, opts: CollectOptions, layers: list[int], neurons: dict[int, list[int]] | None) -> Capture:
    if opts.source == "transcoder":
        return TranscoderCapture(net, layers)
    return NeuronCapture(net, layers, neurons)


def _prepare_store(store_dir: Path, info: dict, data: dict, settings: dict, opts: CollectOptions, source_settings: dict) -> Manifest:
    if is_store(store_dir):
        manifest = Manifest.load(store_dir)
        manifest.check_compatible(info, data, settings, opts.source, source_settings)
    else:
        if store_dir.exists() and any(p.name != ".lock" for p in store_dir.iterdir()):
            raise UserError(f"{store_dir} exists and is not a feature store; refusing to write into it")
        manifest = Manifest.create(store_dir, info, data, settings)
    manifest.data["sources"][opts.source] = source_settings
    manifest.save()
    return manifest


def collect(model: str, data: str, store: str | Path, **options):
    """Collect activations of ``model`` over ``data`` into the store directory ``store``; returns the Store."""
    from .store import Store

    opts = CollectOptions(**options)
    if opts.source not in schema.SOURCES:
        raise UserError(f"unknown --source {opts.source!r}; use transcoder or neurons")
    if opts.format not in FORMATS:
        raise UserError(f"unknown --format {opts.format!r}; use one of {', '.join(FORMATS)}")
    for name in ("max_length", "batch_tokens", "chunk_size"):
        if getattr(opts, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive")
    if opts.max_samples is not None and opts.max_samples <= 0:
        raise UserError("--max-samples must be positive")
    store_dir = Path(store).expanduser()
    dataset = open_dataset(data)
    device = opts.device or default_device()
    net, ckpt = load_model(model, dtype=opts.dtype, device=device, revision=opts.revision,
                           require_adapter=opts.source == "transcoder")
    tokenizer = load_tokenizer(opts.tokenizer or ckpt.path)
    layers = opts.layers if opts.layers is not None else list(range(ckpt.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < ckpt.n_layers]
    if bad or not layers:
        raise UserError(f"--layers {bad or layers} out of range: the model has {ckpt.n_layers} layers")

    info = ckpt.to_dict() | {"weights_fingerprint": weights_fingerprint(ckpt.path), "tokenizer_vocab_size": len(tokenizer)}
    data_info = {"path": str(data), "sha256": dataset.sha256, "n_rows": len(dataset)}
    settings = {key: getattr(opts, key) for key in DATA_KEYS} | {"tokenizer": opts.tokenizer or "model"}
    source_settings = {"layers": layers, "dtype": str(parse_dtype(opts.dtype, device)).removeprefix("torch.")}
    neurons = None
    if opts.source == "neuron":
        neurons = sample_neurons(ckpt.d_mlp, opts.neurons_per_layer, layers, opts.seed)
        source_settings |= {"neurons_per_layer": opts.neurons_per_layer, "seed": opts.seed,
                            "neurons": {str(k): v for k, v in neurons.items()}}

    with writer_lock(store_dir):
        manifest = _prepare_store(store_dir, info, data_info, settings, opts, source_settings)
        _write_static_tables(manifest, net, tokenizer, opts.source, layers, neurons)
        run = {"source": opts.source, "started": now(), "finished": None,
               "options": {k: v for k, v in asdict(opts).items() if k not in ("stop_after_chunks", "progress")}}
        manifest.data["runs"].append(run)
        manifest.save()
        _collect_chunks(manifest, dataset, net, tokenizer, opts, layers, neurons, device)
        if opts.stop_after_chunks is None or _all_done(manifest, dataset, opts):
            run["finished"] = now()
            manifest.save()
    return Store(store_dir)


def _n_rows(dataset: Dataset, opts: CollectOptions) -> int:
    return len(dataset) if opts.max_samples is None else min(len(dataset), opts.max_samples)


def _all_done(manifest: Manifest, dataset: Dataset, opts: CollectOptions) -> bool:
    n_chunks = -(-_n_rows(dataset, opts) // opts.chunk_size)
    return len(manifest.committed(opts.source)) >= n_chunks


def _write_static_tables(manifest: Manifest, net, tokenizer, source: str, layers: list[int], neurons) -> None:
    """The vocabulary (once per store) and the logit lens (once per source)."""
    root = manifest.root
    if manifest.data.get("vocab") is None:
        write_parquet_atomic(build_vocab(tokenizer), root / schema.VOCAB_FILE)
        manifest.data["vocab"] = schema.VOCAB_FILE
    if source not in manifest.data["logit_lens"]:
        unembed = net.lm_head.weight
        files = []
        for layer in layers:
            if source == "transcoder":
                table = logit_lens_table(unembed, transcoder_directions(net, layer), list(range(net.config.transcoder_n_features)))
            else:
                table = logit_lens_table(unembed, neuron_directions(net, layer, neurons[layer]), neurons[layer])
            rel = f"{schema.partition_dir('logit_lens', source, layer)}/logit_lens.parquet"
            write_parquet_atomic(table, root / rel)
            files.append(rel)
        manifest.data["logit_lens"][source] = files
    manifest.save()


def _collect_chunks(manifest: Manifest, dataset: Dataset, net, tokenizer, opts: CollectOptions, layers, neurons, device) -> None:
    n_rows = _n_rows(dataset, opts)
    chunks = range(-(-n_rows // opts.chunk_size))
    done = manifest.committed(opts.source)
    todo = [c for c in chunks if c not in done]
    if not todo:
        print(f"store already holds all {len(done)} chunks of {opts.source} activations; nothing to do", file=sys.stderr)
        return
    markers = MarkerIds.from_tokenizer(tokenizer)
    pad_id = next(x for x in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if x is not None)
    n_units = {layer: (net.config.transcoder_n_features if opts.source == "transcoder" else len(neurons[layer])) for layer in layers}
    unit_ids = {layer: (np.arange(n_units[layer]) if neurons is None else np.asarray(neurons[layer])) for layer in layers}
    capture = _make_capture(net, opts, layers, neurons)
    writer = ChunkWriter(manifest, opts.source, unit_ids)
    todo_rows = sum(min(n_rows, (c + 1) * opts.chunk_size) - c * opts.chunk_size for c in todo)
    bar = tqdm(total=todo_rows, unit="seq", desc=f"collect {opts.source}", disable=not opts.progress, file=sys.stderr)
    started, n_tokens, committed_now = time.perf_counter(), 0, 0
    ok = False
    try:
        for chunk in todo:
            start, stop = chunk * opts.chunk_size, min(n_rows, (chunk + 1) * opts.chunk_size)
            tok = tokenize_chunk(dataset.rows(start, stop), tokenizer, opts, markers)
            with_tokens = not manifest.has_tokens(chunk)
            writer._wait(keep=0)  # a stale-file sweep must not race a write of the same chunk
            writer.clear_stale(chunk, with_tokens)
            part_futures: list[Future] = []
            parts = {layer: 0 for layer in layers}

            def flush(layer: int) -> None:
                rows = capture.acc[layer].take_rows()
                if rows is None:
                    return
                if opts.source == "transcoder":
                    capture.acc[layer].add_stats_from_rows(rows[0], rows[3])
                part_futures.append(writer.submit(writer.write_part, chunk, layer, parts[layer], rows))
                parts[layer] += 1

            lengths = [len(x) for x in tok.ids]
            for batch in plan_batches(lengths, opts.batch_tokens):
                run_batch(net, [tok.ids[i] for i in batch], [tok.seq_ids[i] for i in batch], pad_id, device, capture)
                for layer in layers:
                    if capture.acc[layer].n_rows >= opts.flush_rows:
                        flush(layer)
                n_tokens += sum(lengths[i] for i in batch)
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):,.0f}", refresh=False)
            bar.update(tok.n_skipped)
            for layer in layers:
                flush(layer)
            stats = {layer: capture.acc[layer].take_stats() for layer in layers}
            record = {"source": opts.source, "chunk": chunk, "rows": [start, stop], "n_sequences": len(tok.seq_ids),
                      "n_skipped": tok.n_skipped, "n_tokens": int(sum(lengths)), "files": {}}
            tables = {"sequences": tok.sequences, "tokens": tok.tokens} if with_tokens else {}
            writer.submit(writer.write_chunk, record, part_futures, tables, stats)
            committed_now += 1
            if opts.stop_after_chunks is not None and committed_now >= opts.stop_after_chunks:
                break
        ok = True
    finally:
        capture.remove()
        bar.close()
        with contextlib.suppress(Exception) if not ok else contextlib.nullcontext():
            writer.close(wait=True)
