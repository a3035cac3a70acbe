"""Collection: run a model over a dataset and commit every activation into the store, chunk by chunk.

A chunk is a fixed range of dataset rows (``chunk_size``), the unit of commit and of resume. Its files are
written by a background thread while the next chunk's forward passes run; they become visible only when the
manifest records the chunk, so an interrupted run resumes with exactly the rows an uninterrupted one writes.
"""
from __future__ import annotations

import contextlib
import sys
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from . import schema
from .collect_options import CollectOptions, check_options, parse_layers  # noqa: F401 (re-exported)
from .capture import (Capture, NeuronCapture, StopForward, TranscoderCapture, refuse_nonfinite_activations,
                      refuse_nonfinite_weights, sample_neurons, stats_from_rows)
from .neuron_counts import token_groups
from .neuron_windows import TOP_PER_CHUNK, WINDOW_AFTER, WINDOW_BEFORE
from .data import Dataset, adds_special_tokens, format_text, open_dataset
from .errors import UserError, storage_full
from .logit_lens import logit_lens_table, neuron_directions, transcoder_directions
from .manifest import DATA_KEYS, Manifest, is_store, now, writer_lock
from .modeling import load_model, load_tokenizer, parse_dtype, resolve_device, weights_fingerprint
from .regions import MarkerIds, assign_regions, find_markers
from .storage import store_path, write_parquet_atomic
from .vocab import build_vocab

REGION_DICTIONARY = pa.array(schema.REGIONS, pa.string())


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


def chunk_file_name(chunk: int, part: int | None = None, attempt: str | None = None) -> str:
    """A chunk file's name; distributed attempts carry their id so two workers racing on a chunk never collide."""
    name = schema.chunk_name(chunk, part)
    return name if attempt is None else name.replace(".parquet", f".{attempt}.parquet")


class ChunkWriter:
    """Writes a chunk's files on background threads and commits it; at most one chunk's commit is in flight.

    Activation parts (sort + Parquet, which release the GIL) run on ``threads`` workers, so a fast device is not
    held back by one writer; the chunk's remaining tables and its commit run on one thread, in chunk order.
    ``commit`` (the manifest's) is called with the chunk's record once its files are written; without it
    (a distributed worker) the record is only returned, and the driver commits it. ``wait_s`` is the time the
    forward loop spent blocked on the writers.
    """

    def __init__(self, root: Path, source: str, unit_ids: dict[int, np.ndarray], commit=None, threads: int = 1):
        self.root = root
        self.source = source
        self.unit_ids = unit_ids
        self.commit = commit
        self.threads = max(1, int(threads))
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="featurestore-writer")
        self.chunk_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurestore-commit")
        self.pending: list[Future] = []
        self.pending_chunks: list[Future] = []
        self.wait_s = 0.0
        self.hashes: dict[str, list] = {}  # rel -> [size, sha256] of files written and not yet in a record

    def _write(self, table: pa.Table, rel: str, **options) -> str:
        info = {}
        write_parquet_atomic(table, self.root / rel, info=info, **options)
        self.hashes[rel] = [info["size"], info["sha256"]]
        return rel

    def _wait(self, keep: int) -> None:
        started = time.perf_counter()
        while len(self.pending) > keep:
            self.pending.pop(0).result()
        if keep == 0:
            while self.pending_chunks:
                self.pending_chunks.pop(0).result()
        self.wait_s += time.perf_counter() - started

    def submit(self, fn, *args) -> Future:
        """Queue a part: the caller blocks while every worker is busy and one more part is already queued."""
        self._wait(keep=self.threads)
        future = self.pool.submit(fn, *args)
        self.pending.append(future)
        return future

    def submit_chunk(self, fn, *args) -> Future:
        """Queue a chunk's commit after waiting for the previous chunk's (memory stays one chunk deep)."""
        started = time.perf_counter()
        while self.pending_chunks:
            self.pending_chunks.pop(0).result()
        self.wait_s += time.perf_counter() - started
        future = self.chunk_pool.submit(fn, *args)
        self.pending_chunks.append(future)
        return future

    def close(self, wait: bool = True) -> None:
        try:
            if wait:
                self._wait(keep=0)
        finally:
            self.pool.shutdown(wait=wait, cancel_futures=not wait)
            self.chunk_pool.shutdown(wait=wait, cancel_futures=not wait)

    def write_part_with_stats(self, chunk: int, layer: int, part: int, rows, attempt: str | None, with_stats: bool):
        """A part's file, plus its exact per-feature statistics when the source's come from its rows."""
        stats = stats_from_rows(rows[0], rows[3], len(self.unit_ids[layer])) if with_stats else None
        return layer, self.write_part(chunk, layer, part, rows, attempt), stats

    def clear_stale(self, chunk: int, with_tokens: bool) -> None:
        """Remove files an interrupted run left for this uncommitted chunk."""
        root = self.root
        pattern = f"chunk-{chunk:06d}*.parquet"
        for table in ("activations", "feature_stats", "neuron_windows", "neuron_counts"):
            for path in (root / table / f"source={self.source}").glob(f"layer=*/{pattern}"):
                path.unlink()
        if with_tokens:
            for table in ("tokens", "sequences"):
                for path in (root / table).glob(pattern):
                    path.unlink()

    def write_part(self, chunk: int, layer: int, part: int, rows, attempt: str | None = None) -> str:
        feature, seq_id, pos, act = rows
        table = pa.table({"feature": self.unit_ids[layer][feature].astype(np.int32), "seq_id": seq_id, "pos": pos, "act": act},
                         schema=schema.ACTIVATIONS)
        table = table.sort_by([("feature", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")])
        rel = f"{schema.partition_dir('activations', self.source, layer)}/{chunk_file_name(chunk, part, attempt)}"
        # Small row groups let per-feature reads skip most of a file through min/max statistics on `feature`.
        return self._write(table, rel, row_group_size=schema.ACTIVATION_ROW_GROUP, **schema.ACTIVATION_PARQUET)

    def write_stats(self, chunk: int, layer: int, stats, attempt: str | None = None) -> str:
        count, total, peak = stats
        live = np.flatnonzero(count)
        table = pa.table({"feature": self.unit_ids[layer][live].astype(np.int32), "n_active": count[live],
                          "sum_act": total[live], "max_act": peak[live]}, schema=schema.FEATURE_STATS)
        rel = f"{schema.partition_dir('feature_stats', self.source, layer)}/{chunk_file_name(chunk, None, attempt)}"
        return self._write(table, rel)

    def write_chunk(self, record: dict, part_futures: list[Future], tables: dict[str, pa.Table], stats: dict,
                    neuron_tables: dict[str, dict[int, pa.Table]] | None = None) -> dict:
        files, attempt = record["files"], record.get("attempt")
        files["activations"] = []
        for future in part_futures:
            result = future.result()  # write_part_with_stats's (layer, rel, stats), or write_part's bare rel
            layer, rel, part_stats = result if isinstance(result, tuple) else (None, result, None)
            files["activations"].append(rel)
            if part_stats is not None:
                count, total, peak = stats[layer]
                stats[layer] = (count + part_stats[0], total + part_stats[1], np.maximum(peak, part_stats[2]))
        files["feature_stats"] = [self.write_stats(record["chunk"], layer, s, attempt) for layer, s in sorted(stats.items())]
        for name, per_layer in (neuron_tables or {}).items():  # neuron_windows, neuron_counts
            files[name] = []
            for layer, table in sorted(per_layer.items()):
                rel = f"{schema.partition_dir(name, self.source, layer)}/{chunk_file_name(record['chunk'], None, attempt)}"
                files[name].append(self._write(table, rel))
        for name, table in tables.items():
            options = {"row_group_size": schema.TOKENS_ROW_GROUP} if name == "tokens" else {}
            files[name] = [self._write(table, f"{name}/{chunk_file_name(record['chunk'], None, attempt)}", **options)]
        record["hashes"] = {rel: self.hashes.pop(rel) for rel_list in files.values() for rel in rel_list}
        if self.commit is not None:
            record["committed"] = now()
            self.commit(record)
        return record


def _make_capture(net, opts: CollectOptions, layers: list[int], neurons: dict[int, list[int]] | None) -> Capture:
    if opts.source == "transcoder":
        return TranscoderCapture(net, layers)
    return NeuronCapture(net, layers, neurons, window_sample=opts.neuron_samples, seed=opts.seed)


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
    opts = CollectOptions(**options)
    check_options(opts)
    device = resolve_device(opts.device)
    dataset = open_dataset(data)  # validated whole before the model loads
    net, ckpt = load_model(model, dtype=opts.dtype, device=device, revision=opts.revision,
                           require_adapter=opts.source == "transcoder" or opts.adapters == "on")
    tokenizer = load_tokenizer(opts.tokenizer or ckpt.path)
    return collect_loaded(net, ckpt, tokenizer, data, store, opts, dataset)


def collect_loaded(net, ckpt, tokenizer, data: str, store: str | Path, opts: CollectOptions, dataset: Dataset | None = None):
    """The collection of :func:`collect` with the model already in memory (benchmarks build one on the device).

    Returns the Store; the forward loop's timings (``ChunkCollector.timings``) are in ``store.collect_timings``.
    """
    from .store import Store

    check_options(opts)
    store_dir = store_path(store)
    dataset = dataset or open_dataset(data)
    device = resolve_device(opts.device)
    info, layers, source_settings, neurons = describe_model(ckpt, tokenizer, opts, device)
    refuse_nonfinite_weights(net, max(layers))
    data_info, settings = describe_data(data, dataset, opts)

    try:
        with writer_lock(store_dir):
            manifest = _prepare_store(store_dir, info, data_info, settings, opts, source_settings)
            _write_static_tables(manifest, net, tokenizer, opts.source, layers, neurons)
            run = start_run(manifest, opts)
            timings = _collect_chunks(manifest, dataset, net, tokenizer, opts, layers, neurons, device)
            if opts.stop_after_chunks is None or _all_done(manifest, dataset, opts):
                run["finished"] = now()
                manifest.save()
                finish_collection(manifest, opts)
    except OSError as exc:
        error = storage_full(exc, store_dir, "committed chunks are kept; free space and rerun the same command to resume")
        if error is None:
            raise
        raise error from None
    result = Store(store_dir)
    result.collect_timings = timings
    return result


def finish_collection(manifest: Manifest, opts: CollectOptions) -> None:
    """A completed run compacts the store (``--no-compact`` leaves chunk files as they are)."""
    if opts.compact:
        from .compaction import compact_locked

        compact_locked(manifest, opts.progress)


def describe_model(ckpt, tokenizer, opts: CollectOptions, device: str) -> tuple[dict, list[int], dict, dict | None]:
    """What the manifest records of the model and this source: (model info, layers, source settings, neurons)."""
    layers = opts.layers if opts.layers is not None else list(range(ckpt.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < ckpt.n_layers]
    if bad or not layers:
        raise UserError(f"--layers {bad or layers} out of range: the model has {ckpt.n_layers} layers")

    info = ckpt.to_dict() | {"weights_fingerprint": weights_fingerprint(ckpt.path), "tokenizer_vocab_size": len(tokenizer)}
    source_settings = {"layers": layers, "dtype": str(parse_dtype(opts.dtype, device)).removeprefix("torch.")}
    neurons = None
    if opts.source == "neuron":
        neurons = sample_neurons(ckpt.d_mlp, opts.neurons_per_layer, layers, opts.seed)
        source_settings |= {"neurons_per_layer": opts.neurons_per_layer, "seed": opts.seed,
                            "neurons": {str(k): v for k, v in neurons.items()}} | neuron_settings(opts)
    return info, layers, source_settings, neurons


def neuron_settings(opts: CollectOptions) -> dict:
    """What decides a neuron store's values and windows: the model branch measured and the kept windows."""
    return {"adapters": opts.adapters or "off",
            "windows": {"before": WINDOW_BEFORE, "after": WINDOW_AFTER, "top": TOP_PER_CHUNK, "sample": opts.neuron_samples}}


def batch_groups(groups: list[tuple], device) -> tuple:
    """(region, bin, domains) of a batch's sequences as padded (B, T) tensors (-1 at padding) and a list."""
    longest = max(len(g[0]) for g in groups)
    region = torch.full((len(groups), longest), -1, dtype=torch.long)
    bins = torch.full((len(groups), longest), -1, dtype=torch.long)
    for row, (r, b, _) in enumerate(groups):
        region[row, : len(r)] = torch.from_numpy(r)
        bins[row, : len(b)] = torch.from_numpy(b)
    return region.to(device), bins.to(device), [g[2] for g in groups]


def disable_adapters(net) -> None:
    """Run every MLP as the plain Qwen2 MLP (what the original's AutoModelForCausalLM loads): no adapter branch."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    for layer in net.model.layers:
        if hasattr(layer.mlp, "transcoder_enc"):
            layer.mlp.forward = types.MethodType(Qwen2MLP.forward, layer.mlp)


def describe_data(data: str, dataset: Dataset, opts: CollectOptions) -> tuple[dict, dict]:
    """What the manifest records of the dataset and of the settings that decide its tokens."""
    data_info = {"path": str(data), "sha256": dataset.sha256, "n_rows": len(dataset)}
    settings = {key: getattr(opts, key) for key in DATA_KEYS} | {"tokenizer": opts.tokenizer or "model"}
    return data_info, settings


def start_run(manifest: Manifest, opts: CollectOptions, **extra) -> dict:
    """Log this invocation in the manifest's runs; the caller sets ``finished`` when every chunk is in."""
    run = {"source": opts.source, "started": now(), "finished": None,
           "options": {k: v for k, v in asdict(opts).items() if k not in ("stop_after_chunks", "progress")}} | extra
    manifest.data["runs"].append(run)
    manifest.save()
    return run


def _n_rows(dataset: Dataset, opts: CollectOptions) -> int:
    return len(dataset) if opts.max_samples is None else min(len(dataset), opts.max_samples)


def _all_done(manifest: Manifest, dataset: Dataset, opts: CollectOptions) -> bool:
    n_chunks = -(-_n_rows(dataset, opts) // opts.chunk_size)
    return len(manifest.committed(opts.source)) >= n_chunks


def _write_static_tables(manifest: Manifest, net, tokenizer, source: str, layers: list[int], neurons) -> None:
    """The vocabulary (once per store) and the logit lens (once per source)."""
    written = write_static_tables(manifest.root, net, tokenizer, source, layers, neurons,
                                  vocab=manifest.data.get("vocab") is None,
                                  logit_lens=source not in manifest.data["logit_lens"])
    record_static_tables(manifest, source, written)


def record_static_tables(manifest: Manifest, source: str, written: dict) -> None:
    if written.get("vocab"):
        manifest.data["vocab"] = written["vocab"]
    if written.get("logit_lens") is not None:
        manifest.data["logit_lens"][source] = written["logit_lens"]
    manifest.data.setdefault("hashes", {}).update(written.get("hashes", {}))
    manifest.save()
    if written.get("hashes"):
        from .checks import remember

        remember(manifest, written["hashes"])


def write_static_tables(root: Path, net, tokenizer, source: str, layers: list[int], neurons, *, vocab: bool,
                        logit_lens: bool) -> dict:
    """Write the asked static tables; returns what to record: {"vocab": file or None, "logit_lens": files or None}."""
    written = {"vocab": None, "logit_lens": None, "hashes": {}}

    def write(table: pa.Table, rel: str) -> None:
        info = {}
        write_parquet_atomic(table, root / rel, info=info)
        written["hashes"][rel] = [info["size"], info["sha256"]]

    if vocab:
        write(build_vocab(tokenizer), schema.VOCAB_FILE)
        written["vocab"] = schema.VOCAB_FILE
    if logit_lens:
        unembed = net.lm_head.weight
        files = []
        for layer in layers:
            if source == "transcoder":
                table = logit_lens_table(unembed, transcoder_directions(net, layer), list(range(net.config.transcoder_n_features)))
            else:
                table = logit_lens_table(unembed, neuron_directions(net, layer, neurons[layer]), neurons[layer])
            rel = f"{schema.partition_dir('logit_lens', source, layer)}/logit_lens.parquet"
            write(table, rel)
            files.append(rel)
        written["logit_lens"] = files
    return written


class ChunkCollector:
    """Turns one chunk's dataset rows into its written files: tokenizing, batched forward passes, capture, writes.

    One per process that runs the model: the single-process loop below and each Ray worker
    (``featurestore.distributed``) share it, so both write the same rows.
    """

    def __init__(self, root: Path, net, tokenizer, opts: CollectOptions, layers: list[int], neurons, device, commit=None):
        self.net, self.tokenizer, self.opts, self.layers, self.device = net, tokenizer, opts, layers, device
        self.markers = MarkerIds.from_tokenizer(tokenizer)
        self.pad_id = next(x for x in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if x is not None)
        n_units = {layer: (net.config.transcoder_n_features if opts.source == "transcoder" else len(neurons[layer])) for layer in layers}
        unit_ids = {layer: (np.arange(n_units[layer]) if neurons is None else np.asarray(neurons[layer])) for layer in layers}
        if opts.source == "neuron" and opts.adapters != "on":
            disable_adapters(net)
        self.capture = _make_capture(net, opts, layers, neurons)
        self.writer = ChunkWriter(root, opts.source, unit_ids, commit, threads=opts.writer_threads)
        self.capture.pinned = opts.pinned_transfers
        self.started, self.n_tokens = time.perf_counter(), 0
        self.forward_s = 0.0

    @property
    def timings(self) -> dict:
        """Seconds the forward loop spent in forward passes (capture included), handing rows to the host, and
        blocked on the writer threads; with ``n_tokens``, what a benchmark needs to see where time goes."""
        return {"forward_s": self.forward_s, "transfer_s": self.capture.transfer_s, "writer_wait_s": self.writer.wait_s,
                "n_tokens": self.n_tokens}

    def submit_chunk(self, chunk: int, rows, row_range: tuple[int, int], with_tokens: bool, attempt: str | None = None,
                     bar=None) -> Future:
        """Run the chunk's forward passes and queue its files; the future gives its record once they are written."""
        opts, capture, writer = self.opts, self.capture, self.writer
        tok = tokenize_chunk(rows, self.tokenizer, opts, self.markers)
        part_futures: list[Future] = []
        parts = {layer: 0 for layer in self.layers}

        def flush(layer: int) -> None:
            rows = capture.acc[layer].take_rows()
            if rows is None:
                return
            if not np.isfinite(rows[3]).all():  # one pass over the flushed rows, on the host, before any commit
                refuse_nonfinite_activations(self.net, opts.source, layer)
            part_futures.append(writer.submit(writer.write_part_with_stats, chunk, layer, parts[layer], rows, attempt,
                                              opts.source == "transcoder"))
            parts[layer] += 1

        lengths = [len(x) for x in tok.ids]
        groups = token_groups(tok.tokens, tok.sequences, tok.seq_ids) if opts.source == "neuron" else None
        for batch in plan_batches(lengths, opts.batch_tokens):
            if groups is not None:
                capture.groups = batch_groups([groups[tok.seq_ids[i]] for i in batch], self.device)
            started = time.perf_counter()
            run_batch(self.net, [tok.ids[i] for i in batch], [tok.seq_ids[i] for i in batch], self.pad_id, self.device, capture)
            self.forward_s += time.perf_counter() - started
            for layer in self.layers:
                if capture.acc[layer].n_rows >= opts.flush_rows:
                    flush(layer)
            self.n_tokens += sum(lengths[i] for i in batch)
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(tok_s=f"{self.n_tokens / max(time.perf_counter() - self.started, 1e-9):,.0f}", refresh=False)
        if bar is not None:
            bar.update(tok.n_skipped)
        for layer in self.layers:
            flush(layer)
        stats = {layer: capture.acc[layer].take_stats() for layer in self.layers}
        neuron_tables = None
        if opts.source == "neuron":
            neuron_tables = {"neuron_windows": {layer: capture.windows[layer].take_table() for layer in self.layers},
                             "neuron_counts": {layer: capture.counts[layer].take_table(writer.unit_ids[layer])
                                               for layer in self.layers}}
        record = {"source": opts.source, "chunk": chunk, "rows": list(row_range), "n_sequences": len(tok.seq_ids),
                  "n_skipped": tok.n_skipped, "n_tokens": int(sum(lengths)), "files": {}}
        if attempt is not None:
            record["attempt"] = attempt
        tables = {"sequences": tok.sequences, "tokens": tok.tokens} if with_tokens else {}
        return writer.submit_chunk(writer.write_chunk, record, part_futures, tables, stats, neuron_tables)

    def close(self, ok: bool = True) -> None:
        """Remove the hooks and finish pending writes (errors of a failed run's writes are not raised again)."""
        self.capture.remove()
        with contextlib.suppress(Exception) if not ok else contextlib.nullcontext():
            self.writer.close(wait=True)


def _collect_chunks(manifest: Manifest, dataset: Dataset, net, tokenizer, opts: CollectOptions, layers, neurons, device) -> dict:
    n_rows = _n_rows(dataset, opts)
    chunks = range(-(-n_rows // opts.chunk_size))
    done = manifest.committed(opts.source)
    todo = [c for c in chunks if c not in done]
    if not todo:
        print(f"store already holds all {len(done)} chunks of {opts.source} activations; nothing to do", file=sys.stderr)
        return {}
    collector = ChunkCollector(manifest.root, net, tokenizer, opts, layers, neurons, device, commit=manifest.commit_chunk)
    todo_rows = sum(min(n_rows, (c + 1) * opts.chunk_size) - c * opts.chunk_size for c in todo)
    bar = tqdm(total=todo_rows, unit="seq", desc=f"collect {opts.source}", disable=not opts.progress, file=sys.stderr)
    committed_now = 0
    ok = False
    try:
        for chunk in todo:
            start, stop = chunk * opts.chunk_size, min(n_rows, (chunk + 1) * opts.chunk_size)
            with_tokens = not manifest.has_tokens(chunk)
            collector.writer._wait(keep=0)  # a stale-file sweep must not race a write of the same chunk
            collector.writer.clear_stale(chunk, with_tokens)
            collector.submit_chunk(chunk, dataset.rows(start, stop), (start, stop), with_tokens, bar=bar)
            committed_now += 1
            if opts.stop_after_chunks is not None and committed_now >= opts.stop_after_chunks:
                break
        ok = True
    finally:
        bar.close()
        collector.close(ok)
    return collector.timings
