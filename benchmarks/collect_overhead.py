"""Collection overhead: full collection into a store vs. plain forward passes with the same batching.

    .venv/bin/python benchmarks/collect_overhead.py [--runs 5] [--rows 350]

Prints the median ratio (b/a) over several runs, where (a) is the bare forward passes (decoder stack, same
chunks and batches, no capture) and (b) is ``featurestore.collect`` into a fresh store (tokenization,
capture, sorting, Parquet writing, logit lens and vocabulary included). Then the peak RSS of a collection
subprocess at N and 4N sequences, to show memory does not grow with the dataset.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import featurestore as fs
from featurestore.collection import CollectOptions, plan_batches, run_batch, tokenize_chunk
from featurestore.data import open_dataset
from featurestore.demo import TRACES_PATH, build_demo_checkpoint
from featurestore.modeling import load_model, load_tokenizer
from featurestore.regions import MarkerIds


def bare_forward_seconds(checkpoint: Path, data: Path, opts: CollectOptions) -> float:
    net, _ = load_model(str(checkpoint), device="cpu")
    tok = load_tokenizer(checkpoint)
    dataset = open_dataset(str(data))
    markers = MarkerIds.from_tokenizer(tok)
    chunks = []
    for start in range(0, len(dataset), opts.chunk_size):
        chunks.append(tokenize_chunk(dataset.rows(start, start + opts.chunk_size), tok, opts, markers))
    pad = tok.pad_token_id or 0
    started = time.perf_counter()
    for chunk in chunks:
        for batch in plan_batches([len(x) for x in chunk.ids], opts.batch_tokens):
            run_batch(net, [chunk.ids[i] for i in batch], [chunk.seq_ids[i] for i in batch], pad, "cpu", None)
    return time.perf_counter() - started


def collect_seconds(checkpoint: Path, data: Path, store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    started = time.perf_counter()
    fs.collect(str(checkpoint), str(data), store, progress=False, device="cpu")
    return time.perf_counter() - started


def peak_rss_mb(checkpoint: Path, data: Path, store: Path) -> float:
    shutil.rmtree(store, ignore_errors=True)
    code = (f"import featurestore as fs, resource; fs.collect({str(checkpoint)!r}, {str(data)!r}, {str(store)!r}, "
            f"progress=False, device='cpu'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="fs-bench-"))
    checkpoint = build_demo_checkpoint(work / "checkpoint")
    opts = CollectOptions()
    bare, full = [], []
    collect_seconds(checkpoint, TRACES_PATH, work / "warmup")
    for run in range(args.runs):
        bare.append(bare_forward_seconds(checkpoint, TRACES_PATH, opts))
        full.append(collect_seconds(checkpoint, TRACES_PATH, work / "store"))
        print(f"run {run + 1}: forward {bare[-1]:.3f} s, collect {full[-1]:.3f} s, ratio {full[-1] / bare[-1]:.2f}", file=sys.stderr)
    store = fs.open(work / "store")
    density = store.sql("SELECT sum(activation_count) / any_value(n_tokens) / count(DISTINCT layer) "
                        "FROM features JOIN source_tokens USING (source)").fetchall()[0][0]
    n_tokens = store.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
    ratios = [f / b for f, b in zip(full, bare)]
    print(f"demo model, {n_tokens:,} tokens, {density:.1f} active features per token per layer, torch threads {torch.get_num_threads()}")
    print(f"bare forward: median {statistics.median(bare):.3f} s;  full collection: median {statistics.median(full):.3f} s")
    print(f"collect / forward ratio: median {statistics.median(ratios):.2f} (runs: {', '.join(f'{r:.2f}' for r in ratios)})")

    rows = TRACES_PATH.read_text().splitlines()
    big = work / "x4.jsonl"
    big.write_text("\n".join(rows * 4) + "\n")
    rss_n = peak_rss_mb(checkpoint, TRACES_PATH, work / "rss1")
    rss_4n = peak_rss_mb(checkpoint, big, work / "rss4")
    print(f"peak RSS: {rss_n:,.0f} MB at N={len(rows)} sequences, {rss_4n:,.0f} MB at 4N={4 * len(rows)} "
          f"(ratio {rss_4n / rss_n:.2f})")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
