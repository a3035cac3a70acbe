"""`featurestore check` and `compact` against one read of the files they touch (target: each ≤ 2x).

    python benchmarks/compaction.py [--layers 4] [--chunks 16] [--tokens 20000] [--repeats 3] [--store DIR]

Builds a synthetic store through the project's own writers (``ChunkWriter``, manifest commits), with only the
forward pass replaced by a generator: 8192 features per layer, heavy-tailed feature frequencies, ~5 active features
per token. Then, each ``--repeats`` times on a fresh copy, prints medians of:
- check: ``check_store`` vs one read of every listed file's bytes (the floor of any verification);
- compact: ``compact`` vs one scan of the activation and feature_stats files it rewrites
  (``SELECT sum(act), count(*)`` in DuckDB), and per-feature reads before and after.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

import duckdb
import numpy as np

N_FEATURES = 8192


def build_store(root: Path, layers: int, chunks: int, tokens: int, seed: int = 0) -> int:
    from featurestore.collection import ChunkWriter
    from featurestore.manifest import Manifest

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, N_FEATURES + 1) ** 1.1  # heavy tail: a few features on >1% of tokens
    weights[rng.choice(N_FEATURES, N_FEATURES // 20, replace=False)] = 0  # some dead
    weights /= weights.sum()
    cdf = np.cumsum(weights)
    permutation = rng.permutation(N_FEATURES)
    manifest = Manifest.create(root, {"name": "synthetic", "n_layers": layers, "n_features": N_FEATURES}, {"sha256": "-"}, {})
    manifest.data["sources"]["transcoder"] = {"layers": list(range(layers))}
    manifest.save()
    writer = ChunkWriter(root, "transcoder", {layer: np.arange(N_FEATURES) for layer in range(layers)}, manifest.commit_chunk)
    total = 0
    for chunk in range(chunks):
        parts, stats = [], {}
        seq = (chunk * 64 + np.arange(tokens) // 5000).astype(np.int32)
        pos = (np.arange(tokens) % 5000).astype(np.int32)
        for layer in range(layers):
            feature = permutation[np.minimum(np.searchsorted(cdf, rng.random(tokens * 5)), N_FEATURES - 1)]
            row_seq, row_pos = np.repeat(seq, 5), np.repeat(pos, 5)
            act = rng.exponential(1.0, len(feature)).astype(np.float32) + 0.01
            future = Future()
            future.set_result(writer.write_part(chunk, layer, 0, (feature, row_seq, row_pos, act)))
            parts.append(future)
            count = np.bincount(feature, minlength=N_FEATURES).astype(np.int64)
            peak = np.zeros(N_FEATURES, np.float32)
            np.maximum.at(peak, feature, act)
            stats[layer] = (count, np.bincount(feature, act, minlength=N_FEATURES), peak)
            total += len(feature)
        record = {"source": "transcoder", "chunk": chunk, "rows": [chunk * 64, chunk * 64 + 64], "n_sequences": 64,
                  "n_skipped": 0, "n_tokens": tokens, "files": {}}
        writer.write_chunk(record, parts, {}, stats)
    writer.close()
    return total


def read_bytes(root: Path, rels: list[str]) -> None:
    for rel in rels:
        with open(root / rel, "rb", buffering=0) as handle:
            while handle.read(8 << 20):
                pass


def scan(root: Path, rels: list[str]) -> None:
    for table, column in (("activations", "act"), ("feature_stats", "sum_act")):
        files = "[" + ", ".join(f"'{root / rel}'" for rel in rels if rel.startswith(table + "/")) + "]"
        duckdb.sql(f"SELECT sum({column}), count(*) FROM read_parquet({files})").fetchall()


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def per_feature_ms(root: Path, feature: int) -> float:
    import featurestore as fs

    store = fs.open(root)
    runs = []
    for _ in range(5):
        runs.append(timed(lambda: store.sql(f"SELECT * FROM activations WHERE layer = 0 AND feature = {feature} "
                                            "ORDER BY act DESC LIMIT 20").fetchall()))
    return statistics.median(runs) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=20000, help="tokens per chunk")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--store", default=None, help="where to build the store (default: a temporary directory)")
    args = parser.parse_args()

    from featurestore.checks import check_store
    from featurestore.compaction import compact
    from featurestore.manifest import Manifest

    work = Path(args.store or tempfile.mkdtemp(prefix="compaction-bench-"))
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    start = time.perf_counter()
    n = build_store(base, args.layers, args.chunks, args.tokens)
    size = sum(p.stat().st_size for p in base.rglob("*.parquet"))
    print(f"store: {args.layers} layers x {N_FEATURES} features, {args.chunks} chunks, {n:,} activations, "
          f"{size / 1e6:.1f} MB ({size / n:.2f} B/activation), built in {time.perf_counter() - start:.1f} s", flush=True)
    manifest = Manifest.load(base)
    listed = manifest.listed()
    touched = manifest.files("activations") + manifest.files("feature_stats")
    hot = int(duckdb.sql(f"SELECT feature FROM read_parquet('{base}/activations/source=transcoder/layer=0/*.parquet') "
                         "GROUP BY feature ORDER BY count(*) DESC LIMIT 1").fetchall()[0][0])

    figures: dict[str, list[float]] = {k: [] for k in ("read", "check", "scan", "compact")}
    before_ms = per_feature_ms(base, hot)
    after_ms = None
    for _ in range(args.repeats):
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        figures["read"].append(timed(lambda: read_bytes(copy, listed)))
        figures["check"].append(timed(lambda: check_store(copy, progress=False)))
        figures["scan"].append(timed(lambda: scan(copy, touched)))
        figures["compact"].append(timed(lambda: compact(copy, progress=False)))
        after_ms = per_feature_ms(copy, hot)
    med = {k: statistics.median(v) for k, v in figures.items()}
    print(f"check   {med['check']:.2f} s vs one read of the {len(listed)} files {med['read']:.2f} s: "
          f"ratio {med['check'] / med['read']:.2f} (target <= 2)")
    print(f"compact {med['compact']:.2f} s vs one scan of the {len(touched)} files it rewrites {med['scan']:.2f} s: "
          f"ratio {med['compact'] / med['scan']:.2f} (target <= 2)")
    print(f"top-20 of the most frequent feature of layer 0: {before_ms:.1f} ms before, {after_ms:.1f} ms after compaction")
    print(f"medians of {args.repeats} runs; {sys.argv[0]} on a shared, noisy machine")
    if args.store is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
