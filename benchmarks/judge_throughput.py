"""Judge throughput: features per second at several concurrency levels against a local OpenAI-compatible
server that answers every request after a fixed latency (default 200 ms), so the server is the limit only
when concurrency / latency exceeds what the client side (evidence from the store, HTTP, writing) sustains.

    python benchmarks/judge_throughput.py [--latency 0.2] [--concurrency 1,8,32] [--seconds 6] [--repeats 3]

Builds a small store once under --work (a tiny random Qwen2 + adapter, 2 layers x 512 features, 120 traces).
Each measurement is a fresh run (rerun=True) of ``classify`` (1 request per feature) and of ``autointerp``
(explain + 2 detections + 2 controls = 5 requests per feature) over about --seconds of ideal work; prints
the median features/s of --repeats runs, the ideal (concurrency / latency / requests per feature) and the
ratio, plus the speed-up over concurrency 1. For reference it also measures the bare ``openai`` client
(requests/s, nothing else done) at the same concurrency on the same machine: the ceiling the client side
can reach there, whatever featurestore does.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import featurestore as fs  # noqa: E402
from featurestore.interp import EvidenceSettings, JudgeSettings, autointerp, classify  # noqa: E402


def build_store(work: Path) -> Path:
    store = work / "store"
    if (store / "featurestore.json").exists():
        return store
    from conftest import build_tiny_model, build_tokenizer, make_rows, write_jsonl

    rows = make_rows(120, seed=5)
    data = write_jsonl(work / "data.jsonl", rows)
    tokenizer = build_tokenizer(work / "tok", [r["conversations"][0]["value"] + " " + r["conversations"][1]["value"]
                                               for r in rows])
    model = build_tiny_model(work / "model", tokenizer, layers=2, n_features=512, enc_bias=-3.0)
    fs.collect(str(model), str(data), store, chunk_size=32, batch_tokens=4096, progress=False)
    return store


def measure(store, kind: str, base_url: str, concurrency: int, n_per_layer: int) -> tuple[float, int]:
    judge = JudgeSettings(model="bench", base_url=base_url, concurrency=concurrency)
    evidence = EvidenceSettings(before=20, after=10)
    run = classify if kind == "classify" else autointerp
    started = time.perf_counter()
    result = run(store, judge, n_per_layer=n_per_layer, evidence=evidence, rerun=True, progress=False,
                 api_key="bench", min_examples=20)
    elapsed = time.perf_counter() - started
    done = sum(result.counts.values())
    if result.counts.get("ok", 0) != done:
        raise SystemExit(f"{kind}: not every feature succeeded: {result.counts}")
    return done / elapsed, done


def bare_client_rate(base_url: str, concurrency: int, n: int) -> float:
    """Requests/s of AsyncOpenAI alone (a classify-sized prompt), the machine's ceiling for the client side."""
    import openai

    messages = [{"role": "system", "content": "judge " * 400}, {"role": "user", "content": "Classify feature L0F1 " + "x " * 1500}]

    async def run() -> float:
        client = openai.AsyncOpenAI(api_key="bench", base_url=base_url, max_retries=0)
        limit = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with limit:
                await client.chat.completions.with_raw_response.create(model="bench", messages=messages, max_tokens=64)

        started = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        elapsed = time.perf_counter() - started
        await client.close()
        return n / elapsed

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--seconds", type=float, default=6.0, help="ideal duration of one measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kinds", default="classify,autointerp")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "featurestore-judge-bench")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    store = fs.open(build_store(args.work))
    live = store.sql("SELECT layer, count(*) FROM features WHERE activation_count >= 20 GROUP BY 1").fetchall()
    per_layer_max = min(n for _, n in live)
    print(f"store: {store.path} ({sum(n for _, n in live)} features with >= 20 activations over {len(live)} layers); "
          f"server latency {args.latency * 1000:.0f} ms")
    levels = [int(c) for c in args.concurrency.split(",")]
    # the server runs in its own process so that it does not share the client's interpreter lock
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "openai_stub.py"), "--port", "0",
                               "--latency", str(args.latency)], stdout=subprocess.PIPE, text=True)
    try:
        base_url = server.stdout.readline().split()[-1]
        for c in levels:
            n = max(8, round(c / args.latency * args.seconds))
            rate = statistics.median(bare_client_rate(base_url, c, n) for _ in range(args.repeats))
            print(f"bare openai client concurrency {c:>3}: {rate:7.1f} requests/s (ideal {c / args.latency:.1f})", flush=True)
        for kind in args.kinds.split(","):
            requests = 1 if kind == "classify" else 5
            base = None
            for c in levels:
                ideal = c / args.latency / requests
                n_per_layer = max(2, min(per_layer_max, round(ideal * args.seconds / len(live))))
                rates = []
                for _ in range(args.repeats):
                    rate, done = measure(store, kind, base_url, c, n_per_layer)
                    rates.append(rate)
                rate = statistics.median(rates)
                base = base or rate
                print(f"{kind:<11} concurrency {c:>3}: {rate:7.2f} features/s (median of {args.repeats}, {done} features "
                      f"each) ideal {ideal:7.2f} -> {rate / ideal:4.0%} of ideal, x{rate / base:.1f} over concurrency {levels[0]}",
                      flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
