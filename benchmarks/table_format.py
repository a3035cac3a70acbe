"""The table-format decision, measured: a chunk commit and a store open with the manifest vs Delta Lake.

    python benchmarks/table_format.py [--chunks 80,1000] [--repeats 5]

The manifest side uses the store's own ``Manifest`` with records shaped like the real store's (28 layers: one
activation part and one feature_stats file each, tokens and sequences, all with size and sha256). The Delta side
(only when ``deltalake`` is importable; it is not a dependency) appends one small Parquet file per commit to one
table, which is a quarter of what a chunk commit would need (a chunk spans four tables, and a Delta transaction
spans one). Prints medians of ``--repeats`` runs.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from featurestore.manifest import Manifest

LAYERS = 28


def record(chunk: int) -> dict:
    files = {"activations": [f"activations/source=transcoder/layer={layer}/chunk-{chunk:06d}-000.parquet" for layer in range(LAYERS)],
             "feature_stats": [f"feature_stats/source=transcoder/layer={layer}/chunk-{chunk:06d}.parquet" for layer in range(LAYERS)],
             "tokens": [f"tokens/chunk-{chunk:06d}.parquet"], "sequences": [f"sequences/chunk-{chunk:06d}.parquet"]}
    hashes = {rel: [12_345_678, hashlib.sha256(rel.encode()).hexdigest()] for rel_list in files.values() for rel in rel_list}
    return {"source": "transcoder", "chunk": chunk, "rows": [chunk * 64, chunk * 64 + 64], "n_sequences": 64,
            "n_skipped": 0, "n_tokens": 320_000, "files": files, "hashes": hashes, "committed": "2026-01-01T00:00:00+00:00"}


def manifest_figures(n_chunks: int, repeats: int) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = Manifest.create(root, {"name": "m"}, {"sha256": "x"}, {})
        manifest.data["chunks"] = [record(c) for c in range(n_chunks)]
        manifest.save()
        commits = []
        for i in range(repeats):
            start = time.perf_counter()
            manifest.commit_chunk(record(n_chunks + i))
            commits.append(time.perf_counter() - start)
        opens = []
        for _ in range(repeats):
            start = time.perf_counter()
            Manifest.load(root)
            opens.append(time.perf_counter() - start)
        size = (root / "featurestore.json").stat().st_size
    return statistics.median(commits), statistics.median(opens), size


def delta_figures(n_commits: int, repeats: int) -> tuple[float, float]:
    from deltalake import DeltaTable, write_deltalake

    small = pa.table({"feature": pa.array([1], pa.int32()), "act": pa.array([1.0], pa.float32())})
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(n_commits):
            write_deltalake(tmp, small, mode="append")
        commits = []
        for _ in range(repeats):
            start = time.perf_counter()
            write_deltalake(tmp, small, mode="append")
            commits.append(time.perf_counter() - start)
        opens = []
        for _ in range(repeats):
            start = time.perf_counter()
            DeltaTable(tmp).file_uris()
            opens.append(time.perf_counter() - start)
    return statistics.median(commits), statistics.median(opens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="80,1000")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    try:
        import deltalake
    except ImportError:
        deltalake = None
    for n in (int(x) for x in args.chunks.split(",")):
        commit, load, size = manifest_figures(n, args.repeats)
        line = (f"{n:>6} chunks  manifest: {size / 1e6:7.2f} MB, commit {commit * 1e3:7.1f} ms, "
                f"open+validate {load * 1e3:7.1f} ms")
        if deltalake is not None:
            d_commit, d_open = delta_figures(n, args.repeats)
            line += (f" | delta {deltalake.__version__} at {n} versions: commit {d_commit * 1e3:6.1f} ms per table "
                     f"(x4 tables per chunk), open+list {d_open * 1e3:6.1f} ms")
        print(line, flush=True)


if __name__ == "__main__":
    main()
