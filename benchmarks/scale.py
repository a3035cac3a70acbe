"""The store at real shape: a synthetic 28 x 8192 store written through the project's own writers, at two sizes.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py [--sizes 3e7,1.2e8] [--runs 3] [--root DIR] [--workers 2]

Only the forward pass is replaced by a generator: chunks of 64 traces of ~5,000 tokens, ~5 active features per
token and layer drawn from a heavy-tailed (Zipf) frequency over 8192 features (a few on >1% of tokens, most rare,
the last 3% dead), written by ``ChunkWriter`` (the collection's writer: sorted parts, 64k-row groups, per-chunk
stats) and committed to the manifest. At each size it prints:
- bytes on disk per activation, as collected and compacted;
- top-20 and ``Feature.to_json()`` latency for a rare, a median and the most frequent feature, the ``features``
  view and ``count(*)``, on the store as collected (``--no-compact``) and compacted (what ``collect`` leaves);
- ``check`` against one read of every file, and ``compact`` against one read of the files it rewrites and one
  DuckDB scan decoding all their columns, cold (the files evicted from the page cache first: a real store does not
  fit in it) and for check also warm;
- ``export pack``/``json``/``metadata`` of one layer of the compacted store (and metadata of all layers) with wall
  time, peak RSS and the floor (one scan of the layer's activations + gzip of the written documents on one core),
  pack on 1 and 2 workers, and pack once on the store as collected;
then the fitted extrapolation to 1e9 and 7e9 activations. Figures are medians of ``--runs`` runs. Exports run in
child processes so peak RSS is their own (with 2 workers, the workers' RSS is not counted).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

N_LAYERS, N_FEATURES, VOCAB = 28, 8192, 2000
TRACES_PER_CHUNK, TRACE_TOKENS, PER_TOKEN = 64, 5000, 5
EXPORT_LAYER = 3
ROOT = Path(__file__).resolve().parents[1]


def feature_probabilities() -> np.ndarray:
    """Zipf-like: the top feature on ~10% of tokens (at 5 per token), the median rare, the last 3% never."""
    ranks = np.arange(N_FEATURES, dtype=np.float64)
    p = 1.0 / (ranks + 8.0) ** 1.15
    p[int(N_FEATURES * 0.97):] = 0.0
    perm = np.random.default_rng(1).permutation(N_FEATURES)  # frequent features scattered over the id range
    out = np.empty_like(p)
    out[perm] = p / p.sum()
    return out


def build_store(root: Path, n_activations: float) -> Path:
    """A store of about ``n_activations`` activations, written through the collection's own writer."""
    from featurestore import schema
    from featurestore.capture import LayerAccumulator, stats_from_rows
    from featurestore.collect_options import CollectOptions
    from featurestore.collection import ChunkWriter, record_static_tables
    from featurestore.manifest import Manifest, now
    from featurestore.storage import write_parquet_atomic

    if (root / schema.MANIFEST).exists():
        return root
    rng = np.random.default_rng(0)
    probabilities = np.cumsum(feature_probabilities())
    n_tokens_total = int(n_activations / (N_LAYERS * PER_TOKEN))
    manifest = Manifest.create(root, {"name": "synthetic-scale", "n_layers": N_LAYERS, "n_features": N_FEATURES,
                                      "d_model": 0, "d_mlp": 0, "vocab_size": VOCAB}, {"synthetic": True}, {})
    manifest.data["sources"]["transcoder"] = {"layers": list(range(N_LAYERS))}
    texts = [f"tok{i}" for i in range(VOCAB)]
    info = {}
    write_parquet_atomic(pa.table({"token_id": np.arange(VOCAB, dtype=np.int32), "token": texts,
                                   "raw": [t.encode() for t in texts], "partial_utf8": [False] * VOCAB,
                                   "special": [False] * VOCAB}, schema=schema.VOCAB), root / schema.VOCAB_FILE, info=info)
    record_static_tables(manifest, "transcoder", {"vocab": schema.VOCAB_FILE,
                                                  "hashes": {schema.VOCAB_FILE: [info["size"], info["sha256"]]}})
    manifest.data["runs"].append({"started": now(), "synthetic": True})
    manifest.save()
    writer = ChunkWriter(root, "transcoder", {layer: np.arange(N_FEATURES) for layer in range(N_LAYERS)},
                         commit=manifest.commit_chunk)
    flush_rows = CollectOptions().flush_rows
    seq_base, chunk, made = 0, 0, 0
    while made < n_tokens_total:
        lengths = rng.integers(TRACE_TOKENS // 2, TRACE_TOKENS * 3 // 2, size=TRACES_PER_CHUNK)
        lengths = lengths[np.cumsum(lengths) - lengths < n_tokens_total - made]
        lengths[-1] = min(lengths[-1], n_tokens_total - made - int(lengths[:-1].sum()))
        n_tok = int(lengths.sum())
        seq_ids = np.arange(seq_base, seq_base + len(lengths), dtype=np.int32)
        tok_seq = np.repeat(seq_ids, lengths)
        tok_pos = (np.arange(n_tok) - np.repeat(np.cumsum(lengths) - lengths, lengths)).astype(np.int32)
        frac = tok_pos / np.repeat(lengths, lengths)
        region = np.where(tok_pos == 0, 0, np.where(frac < 0.05, 2, np.where(frac < 0.9, 5, 7))).astype(np.int8)
        thinking = np.where(region == 5, (frac - 0.05) / 0.85, np.nan).astype(np.float32)
        tokens = pa.table({"seq_id": tok_seq, "pos": tok_pos,
                           "token_id": rng.integers(0, VOCAB, size=n_tok, dtype=np.int32),
                           "region": pa.DictionaryArray.from_arrays(pa.array(region), pa.array(list(schema.REGIONS))),
                           "thinking_pos": pa.array(thinking, mask=np.isnan(thinking))}, schema=schema.TOKENS)
        domains = np.array(["math", "code", "science"])[seq_ids % 3]
        nulls = pa.nulls(len(seq_ids), pa.int32())
        sequences = pa.table({"seq_id": seq_ids, "domain": domains, "source": domains,
                              "n_tokens": lengths.astype(np.int32), "truncated": np.zeros(len(seq_ids), bool),
                              "complete": np.ones(len(seq_ids), bool), "bos": np.zeros(len(seq_ids), np.int32),
                              "user_marker": nulls, "assistant_marker": nulls, "think_start": nulls,
                              "think_end": nulls}, schema=schema.SEQUENCES)
        parts, stats = [], {}
        for layer in range(N_LAYERS):
            draws = rng.integers(0, n_tok, size=n_tok * PER_TOKEN)
            feature = np.minimum(np.searchsorted(probabilities, rng.random(len(draws))), N_FEATURES - 1)
            key = np.unique(draws.astype(np.int64) * N_FEATURES + feature)  # one row per (token, feature)
            token, feature = key // N_FEATURES, (key % N_FEATURES).astype(np.int32)
            act = (rng.exponential(1.0, size=len(key)) + 0.01).astype(np.float32)
            acc = LayerAccumulator(N_FEATURES)
            for part, start in enumerate(range(0, len(key), flush_rows)):
                s = slice(start, start + flush_rows)
                rows = (feature[s], tok_seq[token[s]], tok_pos[token[s]], act[s])
                acc.add_stats(stats_from_rows(rows[0], rows[3], N_FEATURES))
                parts.append(writer.submit(writer.write_part, chunk, layer, part, rows))
            stats[layer] = acc.take_stats()
        record = {"source": "transcoder", "chunk": chunk, "rows": [int(seq_ids[0]), int(seq_ids[-1]) + 1],
                  "n_sequences": len(seq_ids), "n_skipped": 0, "n_tokens": n_tok, "files": {}}
        writer.submit_chunk(writer.write_chunk, record, parts, {"sequences": sequences, "tokens": tokens}, stats)
        made, seq_base, chunk = made + n_tok, seq_base + len(lengths), chunk + 1
        print(f"  chunk {chunk}: {made:,}/{n_tokens_total:,} tokens", file=sys.stderr)
    writer.close()
    return root


def median_ms(function, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def peak_rss_kb() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: after fork + exec it still carries the parent's peak
    (Linux folds the forked copy's high-water mark into it at exec), which is the benchmark's, not the export's."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def child(kind: str, store: str, out: str, layer: int | None, workers: int) -> None:
    """Runs one export in this process; prints wall seconds and peak RSS (this process and its workers)."""
    import featurestore as fs
    from exporters.feature_json import export_json, export_pack
    from exporters.metadata import export_metadata

    handle = fs.open(store)
    layers = None if layer is None else [layer]
    started = time.perf_counter()
    if kind == "pack":
        export_pack(handle, out, layers=layers, workers=workers, progress=False)
    elif kind == "json":
        export_json(handle, out, layers=layers, workers=workers, progress=False)
    else:
        export_metadata(handle, out, layers=layers)
    wall = time.perf_counter() - started
    rss = peak_rss_kb()
    print(json.dumps({"wall": wall, "rss_mb": rss / 1024}))


def run_child(kind: str, store: Path, out: Path, layer: int | None, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # the previous run's deleted files are discarded now, not during this run's file creation
    args = [sys.executable, __file__, "--child", kind, str(store), str(out), str(-1 if layer is None else layer), str(workers)]
    result = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if result.returncode:
        raise SystemExit(f"{kind} export failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def floor_seconds(store, layer: int, documents: list[bytes]) -> tuple[float, float]:
    """(one scan of the layer's activations, gzip of the documents on one core)."""
    from featurestore import views

    scan = views.activation_scan(store.manifest_obj, "transcoder", layer)
    started = time.perf_counter()
    store.con.execute(f"SELECT sum(act), count(*) FROM {scan}").fetchall()
    read = time.perf_counter() - started
    started = time.perf_counter()
    for document in documents:
        gzip.compress(document, compresslevel=6, mtime=0)
    return read, time.perf_counter() - started


def evict(paths) -> None:
    """Drop the files' pages from the page cache (POSIX_FADV_DONTNEED, no root needed): a real store (63 GB at 7e9
    activations) is read from disk, not memory, so cold figures are the ones that extrapolate."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_seconds(paths) -> float:
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.read(8 << 20):
                pass
    return time.perf_counter() - started


def cold_and_warm(function, paths, runs: int) -> tuple[float, float]:
    """Medians of ``function`` with the files evicted first, and again with them in the page cache."""
    cold, warm = [], []
    for _ in range(runs):
        evict(paths)
        cold.append(median_ms(function, 1) / 1000)
        warm.append(median_ms(function, 1) / 1000)
    return statistics.median(cold), statistics.median(warm)


def latencies(store_dir: Path, runs: int, prefix: str, r: dict) -> None:
    import featurestore as fs

    store = fs.open(store_dir)
    counts = store.sql(f"SELECT feature, activation_count FROM features WHERE layer = {EXPORT_LAYER} "
                       "ORDER BY activation_count, feature").fetchall()
    picks = {"rare": counts[0][0], "median": counts[len(counts) // 2][0], "frequent": counts[-1][0]}
    r["live_features_layer"] = len(counts)
    for name, feature in picks.items():
        handle = store.feature(EXPORT_LAYER, feature)
        r[f"{prefix}top20_{name}_ms"] = median_ms(lambda: handle.top_examples(20), runs)
        r[f"{prefix}to_json_{name}_ms"] = median_ms(lambda: handle.to_json(), runs)
    r[f"{prefix}features_view_ms"] = median_ms(lambda: store.sql("SELECT count(*), sum(activation_count) FROM features").fetchall(), runs)
    r[f"{prefix}count_ms"] = median_ms(lambda: store.sql("SELECT count(*) FROM activations").fetchall(), runs)


def check_and_compact(store_dir: Path, compacted: Path, runs: int, r: dict) -> None:
    """check (in process: the CLI adds ~1 s of imports) on the store as collected, then compact a copy, each cold
    and against one read of the files it touches (and, for compact, one DuckDB scan decoding all their columns)."""
    import duckdb

    from featurestore.checks import check_store
    from featurestore.compaction import compact
    from featurestore.manifest import Manifest

    manifest = Manifest.load(store_dir)
    listed = [store_dir / rel for rel in manifest.listed()]
    r["check_cold_s"], r["check_warm_s"] = cold_and_warm(lambda: check_store(store_dir, progress=False), listed, runs)
    r["read_cold_s"], r["read_warm_s"] = cold_and_warm(lambda: read_seconds(listed), listed, runs)
    touched = [store_dir / rel for rel in manifest.files("activations") + manifest.files("feature_stats")]
    activations = [str(store_dir / rel) for rel in manifest.files("activations")]
    r["touched_read_cold_s"], _ = cold_and_warm(lambda: read_seconds(touched), touched, runs)
    r["decode_cold_s"], _ = cold_and_warm(lambda: duckdb.sql(
        f"SELECT sum(feature), sum(seq_id), sum(pos), sum(act), count(*) FROM read_parquet({activations})").fetchall(),
        touched, runs)
    times = []
    for _ in range(runs):
        shutil.rmtree(compacted, ignore_errors=True)
        shutil.copytree(store_dir, compacted)
        evict(p for p in compacted.rglob("*") if p.is_file())
        started = time.perf_counter()
        compact(compacted, progress=False)
        times.append(time.perf_counter() - started)
    r["compact_s"] = statistics.median(times)


def exports(store_dir: Path, runs: int, workers: int, scratch: Path, r: dict) -> None:
    import featurestore as fs

    store = fs.open(store_dir)
    for kind in ("pack", "json", "metadata"):
        results = [run_child(kind, store_dir, scratch / kind, EXPORT_LAYER, 1) for _ in range(runs)]
        r[f"{kind}_s"] = statistics.median(x["wall"] for x in results)
        r[f"{kind}_rss_mb"] = max(x["rss_mb"] for x in results)
    documents = [p.read_bytes() for p in (scratch / "json" / "features").iterdir()]
    floors = [floor_seconds(store, EXPORT_LAYER, documents) for _ in range(runs)]
    r["scan_s"] = statistics.median(f[0] for f in floors)
    r["gzip_s"] = statistics.median(f[1] for f in floors)
    r["floor_s"] = r["scan_s"] + r["gzip_s"]
    r["pack_2w_s"] = statistics.median(run_child("pack", store_dir, scratch / "pack2", EXPORT_LAYER, workers)["wall"]
                                       for _ in range(runs))
    all_meta = run_child("metadata", store_dir, scratch / "meta_all", None, 1)
    r["metadata_all_s"], r["metadata_all_rss_mb"] = all_meta["wall"], all_meta["rss_mb"]


def measure(store_dir: Path, runs: int, workers: int, scratch: Path, with_exports: bool = True) -> dict:
    """The store as collected (``--no-compact``, or a collection still running), then compacted (what ``collect``
    leaves by default): latencies on both, check and compact, and the exports on the compacted store."""
    import featurestore as fs

    store = fs.open(store_dir)
    acts = store.sql("SELECT count(*) FROM activations").fetchall()[0][0]
    size = sum(p.stat().st_size for p in store_dir.rglob("*") if p.is_file())
    r = {"activations": acts, "bytes_per_activation": size / acts}
    latencies(store_dir, runs, "chunked_", r)
    if with_exports:
        r["pack_chunked_s"] = run_child("pack", store_dir, scratch / "pack", EXPORT_LAYER, 1)["wall"]
    compacted = scratch.parent / f"{store_dir.name}-compacted"
    check_and_compact(store_dir, compacted, runs, r)
    r["compacted_bytes_per_activation"] = sum(p.stat().st_size for p in compacted.rglob("*") if p.is_file()) / acts
    latencies(compacted, runs, "", r)
    if with_exports:
        exports(compacted, runs, workers, scratch, r)
    shutil.rmtree(compacted, ignore_errors=True)
    return r


def report(label: str, r: dict) -> None:
    print(f"\n== {label}: {r['activations']:,} activations; bytes on disk per activation "
          f"{r['bytes_per_activation']:.2f} as collected, {r['compacted_bytes_per_activation']:.2f} compacted")
    for prefix, title in (("chunked_", "as collected"), ("", "compacted")):
        print(f"  {title}:")
        for name in ("rare", "median", "frequent"):
            print(f"    {name:8s} feature: top-20 {r[f'{prefix}top20_{name}_ms']:7.1f} ms   "
                  f"to_json {r[f'{prefix}to_json_{name}_ms']:7.1f} ms")
        print(f"    features view {r[f'{prefix}features_view_ms']:.1f} ms, count(*) {r[f'{prefix}count_ms']:.1f} ms")
    print(f"  check (all files): {r['check_cold_s']:.2f} s cold = {r['check_cold_s'] / r['read_cold_s']:.2f}x one cold "
          f"read ({r['read_cold_s']:.2f} s); {r['check_warm_s']:.2f} s warm = {r['check_warm_s'] / r['read_warm_s']:.2f}x "
          f"one cached read ({r['read_warm_s']:.2f} s)")
    print(f"  compact (cold): {r['compact_s']:.2f} s = {r['compact_s'] / r['touched_read_cold_s']:.2f}x one cold read of "
          f"the files it rewrites ({r['touched_read_cold_s']:.2f} s), {r['compact_s'] / r['decode_cold_s']:.2f}x one cold "
          f"DuckDB scan decoding all their columns ({r['decode_cold_s']:.2f} s)")
    if "pack_s" not in r:
        return
    print(f"  exports of layer {EXPORT_LAYER} ({r['live_features_layer']} live features), compacted store, one worker:")
    for kind in ("pack", "json", "metadata"):
        ratio = r[f"{kind}_s"] / r["floor_s"]
        print(f"    {kind:8s}: {r[f'{kind}_s']:7.2f} s, peak RSS {r[f'{kind}_rss_mb']:6.0f} MB, {ratio:.2f}x the floor")
    print(f"    floor: scan {r['scan_s']:.2f} s + gzip of the documents {r['gzip_s']:.2f} s = {r['floor_s']:.2f} s")
    print(f"    pack on the store as collected: {r['pack_chunked_s']:.2f} s (one run)")
    print(f"    pack on 2 workers: {r['pack_2w_s']:.2f} s = {r['pack_s'] / r['pack_2w_s']:.2f}x one worker")
    print(f"    metadata, all layers: {r['metadata_all_s']:.2f} s, peak RSS {r['metadata_all_rss_mb']:.0f} MB")


def extrapolate(small: dict, large: dict) -> None:
    """Per layer: t = a + b * activations of the layer, fitted on the two sizes; then 28 layers."""
    print("\n== extrapolation (per layer t = a + b*acts, from the two sizes; x 28 layers, 229,376 features)")
    per_layer = [small["activations"] / N_LAYERS, large["activations"] / N_LAYERS]
    for kind in ("pack", "json", "metadata", "floor"):
        if f"{kind}_s" not in large:
            continue
        t0, t1 = small[f"{kind}_s"], large[f"{kind}_s"]
        b = (t1 - t0) / (per_layer[1] - per_layer[0])
        a = t0 - b * per_layer[0]
        if a < 0 or b <= 0:
            print(f"  {kind:8s}: the two sizes do not fit t = a + b*acts (a={a:.2f} s, b={b * 1e6:.3f} us): "
                  "too noisy or too small to extrapolate; rerun with more --runs or larger --sizes")
            continue
        for total in (1e9, 7e9):
            layer_acts = total / N_LAYERS
            print(f"  {kind:8s} {total:.0e}: 28 x ({a:.2f} s + {b * 1e6:.3f} us x {layer_acts:.3g}) = "
                  f"{N_LAYERS * (a + b * layer_acts) / 60:.1f} min (one process)")
    for kind, key in (("check", "check_cold_s"), ("compact", "compact_s")):
        rate = large["activations"] / large[key]
        print(f"  {kind:8s}: {rate / 1e6:.1f}M activations/s at 4N (cold) -> 1e9: {1e9 / rate / 60:.1f} min, "
              f"7e9: {7e9 / rate / 60:.1f} min on this machine")
    growth = {k: large[k] / small[k] for k in large if k.endswith("_ms")}
    print("  latency growth N -> 4N: " + ", ".join(f"{k[:-3]} {v:.2f}x" for k, v in growth.items()))
    if "pack_rss_mb" in large:
        print("  peak RSS growth N -> 4N: " + ", ".join(f"{k} {large[f'{k}_rss_mb'] / small[f'{k}_rss_mb']:.2f}x"
                                                       for k in ("pack", "json", "metadata", "metadata_all")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="3e7,1.2e8", help="Activations of each store (comma-separated).")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "featurestore-scale")
    parser.add_argument("--no-exports", action="store_true", help="Skip the exports (latencies, check, compact only).")
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, store, out, layer, workers = args.child
        return child(kind, store, out, None if int(layer) < 0 else int(layer), int(workers))
    results = []
    for size in [float(s) for s in args.sizes.split(",")]:
        store = args.root / f"store-{size:.0e}"
        started = time.perf_counter()
        build_store(store, size)
        print(f"store of {size:.0e} activations ready in {time.perf_counter() - started:.0f} s: {store}", file=sys.stderr)
        scratch = args.root / "out"
        results.append(measure(store, args.runs, args.workers, scratch, not args.no_exports))
        report(f"{size:.0e}", results[-1])
        shutil.rmtree(scratch, ignore_errors=True)
    if len(results) >= 2:
        extrapolate(results[0], results[-1])


if __name__ == "__main__":
    main()
