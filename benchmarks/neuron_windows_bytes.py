"""Bytes the neuron example windows (and exact breakdown counts) add, measured on the demo model and extrapolated
to the real shape (28 layers, ~25M tokens in 4,996 traces, 500 or 18,944 neurons per layer).

    .venv/bin/python benchmarks/neuron_windows_bytes.py [--rows 350] [--neurons 64] [--chunk-size 64]

Measured: bytes per stored window value (zstd Parquet, all columns included) and values per candidate. The
extrapolation is an upper bound on values (every candidate's full 71-token window, no overlap between windows,
as in long traces) times the measured bytes per value; it prints the ratio to the neuron `activations` table
(per-sequence top 20 rows) at the same shape, and to dense float32 activations.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import featurestore as fs
from featurestore.demo import TRACES_PATH, build_demo_checkpoint
from featurestore.neuron_windows import SAMPLE_PER_CHUNK, TOP_PER_CHUNK, WINDOW


def table_bytes(store, table: str) -> int:
    return sum((store.path / f).stat().st_size for f in store.manifest_obj.files(table, "neuron"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=350)
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_demo_checkpoint(Path(tmp) / "model")
        store = fs.collect(str(model), str(TRACES_PATH), Path(tmp) / "store", source="neuron", neurons_per_layer=args.neurons,
                           chunk_size=args.chunk_size, max_samples=args.rows, device="cpu", progress=False)
        candidates, values = store.sql("select count(*), sum(len(acts)) from neuron_windows").fetchall()[0]
        windows, counts, acts = (table_bytes(store, t) for t in ("neuron_windows", "neuron_counts", "activations"))
        act_rows = store.sql("select count(*) from activations where source = 'neuron'").fetchall()[0][0]
        tokens = store.sql("select sum(n_tokens) from sequences").fetchall()[0][0]
    per_value, per_act_row = windows / values, acts / act_rows
    print(f"measured: {candidates:,} candidates, {values:,} window values ({values / candidates:.1f} per candidate), "
          f"{windows:,} B windows = {per_value:.2f} B/value; counts {counts:,} B; activations {acts:,} B "
          f"({per_act_row:.2f} B/row); {tokens:,} tokens")
    layers, n_tokens, n_seqs, chunk = 28, 25_000_000, 4996, 64
    n_chunks = -(-n_seqs // chunk)
    for n in (500, 18944):
        win_values = layers * n * n_chunks * (TOP_PER_CHUNK + SAMPLE_PER_CHUNK) * WINDOW
        win_bytes = win_values * per_value
        act_bytes = layers * n * n_seqs * 20 * per_act_row
        dense = layers * n * n_tokens * 4
        print(f"real shape, {n} neurons/layer, chunk {chunk}: windows <= {win_bytes / 1e9:,.1f} GB "
              f"({win_bytes / act_bytes:.2f}x the neuron activations table's {act_bytes / 1e9:,.1f} GB; "
              f"dense float32 would be {dense / 1e9:,.0f} GB, {dense / win_bytes:.0f}x the windows)")


if __name__ == "__main__":
    main()
