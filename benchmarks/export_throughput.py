"""Export throughput: features/s of `export json` and `export pack`, the gzip-only floor, and to_json latency.

    .venv/bin/python benchmarks/export_throughput.py [--store DIR] [--runs 3] [--level 6]

Builds (once, or reuses with --store) a store with more than 10,000 live features: the demo tokenizer and traces,
and a seeded 4-layer Qwen2 with 3072 adapter features per layer whose encoder biases make each feature fire on
about 1% of tokens. Then, per run: `export json` and `export pack` on one worker and on all cores, and in the
same run the time to only gzip the same JSON documents (one core, same level) — the floor set by compression.
Prints medians over the runs and the ratios; then the median `Feature.to_json()` latency over 30 features.
"""
from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import featurestore as fs
from exporters.feature_json import export_json, export_pack, feature_document
from exporters.pack import feature_json_bytes

N_LAYERS, N_FEATURES, D_MODEL = 4, 3072, 64


def build_store(root: Path) -> Path:
    from transformers import Qwen2Config

    from featurestore.demo import TRACES_PATH, build_tokenizer
    from featurestore.modeling import Qwen2ForCausalLMWithTranscoder

    store = root / "store"
    if (store / "featurestore.json").exists():
        return store
    tokenizer = build_tokenizer(root / "model")
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=D_MODEL, intermediate_size=128, num_hidden_layers=N_LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=False, transcoder_n_features=N_FEATURES, transcoder_dec_bias=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    config.architectures = ["Qwen2ForCausalLMWithTranscoder"]
    model = Qwen2ForCausalLMWithTranscoder(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 / D_MODEL ** 0.5)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.transcoder_enc.weight.normal_(0, 1 / D_MODEL ** 0.5)  # unit-variance pre-activations
            layer.mlp.transcoder_enc.bias.uniform_(-3.0, -1.8)  # each feature fires on ~0.1% .. 4% of tokens
        model.model.norm.weight.fill_(1.0)
    model.save_pretrained(root / "model")
    fs.collect(str(root / "model"), str(TRACES_PATH), store, device="cpu", progress=True)
    return store


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "featurestore-export-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=6)
    args = parser.parse_args()
    store = fs.open(build_store(args.store))
    live = store.sql("SELECT count(*) FROM features WHERE source = 'transcoder'").fetchall()[0][0]
    tokens = store.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
    acts = store.sql("SELECT count(*) FROM activations").fetchall()[0][0]
    cores = os.cpu_count() or 1
    print(f"store: {live} live features, {tokens} tokens, {acts} activations; {cores} cores; gzip level {args.level}")
    out = Path(tempfile.mkdtemp(prefix="export-bench-"))
    times: dict[str, list[float]] = {}
    try:
        documents: list[bytes] = []
        for run in range(args.runs):
            for workers in sorted({1, cores}):
                os.sync()  # no write-back of the previous step's files competing for the cores while timing
                t, _ = timed(export_json, store, out / "json", workers=workers, progress=False)
                times.setdefault(f"json x{workers}", []).append(t)
                documents = documents or [p.read_bytes() for p in sorted((out / "json" / "features").iterdir())]
                shutil.rmtree(out / "json")  # deleting drops the 400 MB of dirty pages instead of writing them back
                os.sync()
                t, _ = timed(export_pack, store, out / f"pack{workers}", workers=workers, level=args.level, progress=False)
                times.setdefault(f"pack x{workers}", []).append(t)
            os.sync()
            t, _ = timed(lambda: [gzip.compress(d, compresslevel=args.level, mtime=0) for d in documents])
            times.setdefault("gzip only x1", []).append(t)
            if cores > 1:
                same = all((out / "pack1" / n).read_bytes() == (out / f"pack{cores}" / n).read_bytes() for n in os.listdir(out / "pack1"))
                assert same, "pack bytes differ between 1 and N workers"
        mb = sum(len(d) for d in documents) / 1e6
        packed = sum(f.stat().st_size for f in (out / "pack1").iterdir()) / 1e6
        print(f"JSON {mb:.1f} MB ({mb * 1e3 / live:.1f} kB/feature), pack {packed:.1f} MB")
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, seconds in medians.items():
            print(f"{name:>14}: {seconds:7.2f} s  {live / seconds:8.0f} features/s")
        floor = medians["gzip only x1"]
        print(f"pack x1 / gzip floor: {medians['pack x1'] / floor:.2f}")
        if cores > 1:
            print(f"pack x{cores} / gzip floor: {medians[f'pack x{cores}'] / floor:.2f}")
        features = store.sql("SELECT layer, feature FROM features ORDER BY layer, feature").fetchall()
        sample = random.Random(0).sample(features, 30)
        feature_document(store, *sample[0])  # warm the vocabulary and DuckDB caches once
        latencies = [timed(store.feature(layer, feature).to_json)[0] for layer, feature in sample]
        assert store.feature(*sample[1]).to_json() == feature_document(store, *sample[1])
        print(f"to_json latency: median {statistics.median(latencies) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms "
              f"over {len(sample)} features")
        print(f"one document: {len(feature_json_bytes(feature_document(store, *sample[0]))) / 1e3:.1f} kB")
        print("load average (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
