"""Scale-out: collection wall time on 1 and 2 local Ray workers (demo model, CPU), as a speed-up ratio.

    .venv/bin/python benchmarks/scale_out.py [--runs 3] [--chunk-size 16] [--repeat 1]

Starts one local Ray instance (127.0.0.1, no dashboard), then for each worker count collects the demo traces
into a fresh store ``--runs`` times. Prints per worker count the median of (a) the whole call (actors loading the
model included) and (b) the chunk loop alone (first assignment to last commit, the steady state that matters on
long jobs), the speed-up ratios 1→2 workers, and the driver's own time per chunk (reading rows, committing to
the manifest, submitting: what the driver adds to each chunk outside waiting for workers). Each Ray worker runs
torch with one thread per CPU it holds (one by default), so on a 2-core machine 2× is the ceiling.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chunk-size", type=int, default=16, help="rows per chunk (the demo has 350 rows)")
    parser.add_argument("--repeat", type=int, default=1, help="repeat the demo traces this many times")
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback-only local cluster
    import ray

    from featurestore.demo import TRACES_PATH, build_demo_checkpoint
    from featurestore.distributed import ClusterOptions, DriverStats, collect_distributed

    work = Path(tempfile.mkdtemp(prefix="fs-scale-"))
    checkpoint = build_demo_checkpoint(work / "checkpoint")
    data = work / "traces.jsonl"
    data.write_text(TRACES_PATH.read_text() * args.repeat)
    n_cpus = os.cpu_count() or 2
    ray.init(num_cpus=n_cpus, include_dashboard=False, logging_level="warning", log_to_driver=False)
    counts = [int(x) for x in args.workers.split(",")]
    results: dict[int, dict[str, list[float]]] = {}
    try:
        for run in range(args.runs):
            for n in counts:
                store = work / f"store-{n}"
                shutil.rmtree(store, ignore_errors=True)
                stats = DriverStats()
                started = time.perf_counter()
                collect_distributed(str(checkpoint), str(data), store, ClusterOptions(num_workers=n), stats=stats,
                                    progress=False, chunk_size=args.chunk_size, device="cpu")
                total = time.perf_counter() - started
                r = results.setdefault(n, {"total": [], "loop": [], "overhead_ms": []})
                r["total"].append(total)
                r["loop"].append(stats.wall_seconds)
                r["overhead_ms"].append(stats.overhead_per_chunk_ms)
                print(f"run {run + 1}, {n} worker(s): {total:.2f} s total, chunk loop {stats.wall_seconds:.2f} s, "
                      f"{stats.chunks} chunks, driver {stats.overhead_per_chunk_ms:.2f} ms/chunk", file=sys.stderr)
        from featurestore import open as open_store

        n_tokens = open_store(work / f"store-{counts[0]}").sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
        print(f"demo model, {n_tokens:,} tokens, chunk size {args.chunk_size}, {n_cpus} CPUs, medians of {args.runs} runs")
        median = {n: {k: statistics.median(v) for k, v in r.items()} for n, r in results.items()}
        for n in counts:
            m = median[n]
            print(f"{n} worker(s): total {m['total']:.2f} s, chunk loop {m['loop']:.2f} s "
                  f"({n_tokens / m['loop']:,.0f} tok/s), driver overhead {m['overhead_ms']:.2f} ms per chunk")
        base = counts[0]
        for n in counts[1:]:
            print(f"speed-up {base}->{n} workers: chunk loop {median[base]['loop'] / median[n]['loop']:.2f}x, "
                  f"total {median[base]['total'] / median[n]['total']:.2f}x")
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
