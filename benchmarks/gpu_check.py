"""GPU check: collection and attribution at the real model's shape, in one command.

    python benchmarks/gpu_check.py --out gpu_check.json                # CUDA, DeepSeek-R1-Distill-Qwen-7B's shape
    python benchmarks/gpu_check.py --device cpu --tiny --out tiny.json  # the same code at a tiny shape, < 1 min

Builds a Qwen2 + transcoder-adapter model of the real shape (28 layers, hidden 3584, MLP 18944, 28 heads / 4 KV
heads, vocabulary 152,064, 8192 adapter features) directly on the device with random weights in bf16 (no
download), calibrates the adapter encoder biases layer by layer so that the mean L0 is about 1.4 (one run) and
about 10 (another), writes synthetic traces of realistic length (~5,000 tokens, the original's row format) and
measures, in one run:

- collection (``featurestore.collection.collect_loaded``, the path ``featurestore collect`` takes after loading)
  against bare forward passes over the same chunks and batches: the ratio, tokens/s, activations/s committed,
  peak device memory, and the share of wall time the forward loop spent handing rows to the host or blocked on
  the writer threads; with ``--legacy`` also the old path (blocking copies, one writer thread) for before/after;
- the neuron baseline at 500 neurons per layer, the same way;
- RelP attribution of prompts of 512 and 2,048 tokens with the CLI's default feature budget: wall time, peak
  device memory, active features;
- bf16 against float32 on a slice of the same data: stored activations present in only one, how many differ, and
  the largest difference.

It prints a short table and writes every figure as JSON (``--out``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# The repository root first: this folder's attribution.py (a benchmark) must not shadow the attribution package.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"]

REAL = dict(layers=28, d_model=3584, d_mlp=18944, heads=28, kv_heads=4, vocab=152_064, n_features=8192,
            trace_tokens=5000, rows=32, attribution_lengths=(512, 2048), precision_rows=4)
TINY = dict(layers=2, d_model=64, d_mlp=128, heads=4, kv_heads=2, vocab=None, n_features=256,
            trace_tokens=250, rows=16, attribution_lengths=(16, 48), precision_rows=4)
L0_TARGETS = (1.4, 10.0)
NEURONS_PER_LAYER = 500
FEATURE_BUDGET = 10000  # `featurestore attribute --max-feature-nodes` default


@dataclass
class Shape:
    layers: int
    d_model: int
    d_mlp: int
    heads: int
    kv_heads: int
    vocab: int | None
    n_features: int
    trace_tokens: int
    rows: int
    attribution_lengths: tuple[int, ...]
    precision_rows: int


# ---------------------------------------------------------------------------------------------------- the model
def build_model(shape: Shape, tokenizer, device: str, dtype: torch.dtype, seed: int = 0):
    """Random weights of the given shape, built on the device in ``dtype`` (a 7B model never touches the host)."""
    from transformers import Qwen2Config

    from featurestore.modeling import ARCHITECTURE, Qwen2ForCausalLMWithTranscoder

    vocab = shape.vocab or len(tokenizer)
    config = Qwen2Config(vocab_size=vocab, hidden_size=shape.d_model, intermediate_size=shape.d_mlp,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, max_position_embeddings=32768, rope_theta=10000.0,
                         tie_word_embeddings=False, transcoder_n_features=shape.n_features, transcoder_dec_bias=True,
                         architectures=[ARCHITECTURE], bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, torch_dtype=str(dtype).removeprefix("torch."))
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            net = Qwen2ForCausalLMWithTranscoder(config)
    finally:
        torch.set_default_dtype(previous)
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net, config


def checkpoint_stub(config, work: Path):
    """What the store records of the model: the config (its fingerprint) of a checkpoint that holds no weights."""
    from featurestore.modeling import checkpoint_info

    path = work / "checkpoint"
    config.save_pretrained(path)
    return checkpoint_info("gpu-check/random-7b-shape", path, config)


@torch.inference_mode()
def calibrate_l0(net, batches: list[torch.Tensor], target_l0: float) -> list[float]:
    """Shift each layer's encoder bias (layer by layer, earlier layers already shifted) so that on the calibration
    tokens ``target_l0`` of its features are active per token on average; returns the L0 reached per layer."""
    adapters = net.adapters()
    n_features = adapters[0].transcoder_enc.out_features
    keep = target_l0 / n_features
    reached = []
    for index, adapter in enumerate(adapters):
        pre = _encoder_inputs(net, batches, index)
        values = adapter.transcoder_enc(pre).float().reshape(-1)
        k = max(1, int(round((1.0 - keep) * values.numel())))
        threshold = values.kthvalue(k).values
        adapter.transcoder_enc.bias.sub_(threshold.to(adapter.transcoder_enc.bias.dtype))
        reached.append(float((adapter.transcoder_enc(pre) > 0).float().sum(-1).mean()))
        del pre, values
    return reached


def _encoder_inputs(net, batches: list[torch.Tensor], layer: int) -> torch.Tensor:
    """The inputs of one layer's adapter encoder on the calibration batches (the forward stops after that layer)."""
    from featurestore.capture import StopForward

    seen = []
    mlp = net.model.layers[layer].mlp

    def grab(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))
        raise StopForward

    handle = mlp.register_forward_pre_hook(grab)
    try:
        for ids in batches:
            with contextlib.suppress(StopForward):
                net.model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return torch.cat(seen)


# ---------------------------------------------------------------------------------------------------- the data
def synthetic_traces(path: Path, n_rows: int, target_tokens: int, tokenizer, seed: int = 0) -> int:
    """Rows in the original format (domain, source, conversations) whose text is about ``target_tokens`` tokens:
    thinking built from the demo traces' sentences, shuffled. Returns the total token count."""
    from featurestore.data import adds_special_tokens, format_text, open_dataset
    from featurestore.demo import TRACES_PATH

    sentences, prompts = [], []
    for line in TRACES_PATH.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        prompts.append(row["conversations"][0]["value"])
        body = row["conversations"][1]["value"].replace("<think>", "").replace("</think>", "")
        sentences += [s.strip() + "." for s in body.split(".") if s.strip()]
    per_sentence = max(1.0, sum(len(tokenizer(s)["input_ids"]) for s in sentences[:200]) / min(200, len(sentences)))
    rng = random.Random(seed)
    rows = []
    for i in range(n_rows):
        length = int(target_tokens * rng.uniform(0.6, 1.4))
        thought = " ".join(rng.choice(sentences) for _ in range(int(length / per_sentence)))
        rows.append({"domain": ("math", "code", "science")[i % 3], "source": "gpu-check/synthetic",
                     "conversations": [{"from": "user", "value": rng.choice(prompts)},
                                       {"from": "assistant", "value": f"<think>\n{thought}\n</think>\n\nDone."}]})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    dataset = open_dataset(str(path))
    special = adds_special_tokens("deepseek")
    return sum(len(tokenizer(format_text(r, "deepseek", tokenizer), add_special_tokens=special)["input_ids"])
               for r in dataset.rows(0, len(dataset)))


# ---------------------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: str) -> float:
    """Peak device memory since ``reset_peak`` (CUDA); on CPU the process's peak RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bare_forward_seconds(net, tokenizer, data: Path, opts, device: str) -> float:
    """The same chunks and batches as collection, forward passes only (no capture, no writes)."""
    from featurestore.collection import plan_batches, run_batch, tokenize_chunk
    from featurestore.data import open_dataset
    from featurestore.regions import MarkerIds

    dataset = open_dataset(str(data))
    markers = MarkerIds.from_tokenizer(tokenizer)
    pad = next(x for x in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if x is not None)
    chunks = [tokenize_chunk(dataset.rows(s, s + opts.chunk_size), tokenizer, opts, markers)
              for s in range(0, len(dataset), opts.chunk_size)]
    sync(device)
    started = time.perf_counter()
    for chunk in chunks:
        for batch in plan_batches([len(x) for x in chunk.ids], opts.batch_tokens):
            run_batch(net, [chunk.ids[i] for i in batch], [chunk.seq_ids[i] for i in batch], pad, device, None)
    sync(device)
    return time.perf_counter() - started


def run_collection(net, ckpt, tokenizer, data: Path, store: Path, opts, device: str) -> dict:
    """One collection into a fresh store, paired with bare forward passes over the same batches just before it
    (pairing keeps the ratio honest on a machine whose speed drifts)."""
    from featurestore.collection import collect_loaded

    bare_s = bare_forward_seconds(net, tokenizer, data, opts, device)
    shutil.rmtree(store, ignore_errors=True)
    reset_peak(device)
    sync(device)
    started = time.perf_counter()
    result = collect_loaded(net, ckpt, tokenizer, str(data), store, opts)
    sync(device)
    wall = time.perf_counter() - started
    timings = result.collect_timings
    rows = result.sql("SELECT count(*) FROM activations").fetchall()[0][0]
    counted = result.sql("SELECT sum(activation_count) FROM features").fetchall()[0][0]
    tokens = result.sql("SELECT sum(n_tokens) FROM sequences").fetchall()[0][0]
    layers = len(opts.layers) if opts.layers else ckpt.n_layers
    return {"seconds": wall, "bare_forward_seconds": bare_s, "ratio": wall / bare_s, "tokens": int(tokens),
            "tokens_per_s": tokens / wall, "activations": int(rows), "activations_per_s": rows / wall,
            "activations_in_feature_stats": int(counted),
            "activations_per_token_per_layer": rows / max(1, tokens) / layers,
            "peak_memory_gb": peak_memory_gb(device),
            "transfer_share": timings["transfer_s"] / wall, "writer_wait_share": timings["writer_wait_s"] / wall,
            "forward_loop_seconds": timings["forward_s"],
            "settings": {"writer_threads": opts.writer_threads, "pinned_transfers": opts.pinned_transfers,
                         "batch_tokens": opts.batch_tokens, "chunk_size": opts.chunk_size}}


def run_attribution(net, tokenizer, lengths, device: str, seed: int = 0) -> list[dict]:
    from attribution.api import attribute

    rng = random.Random(seed)
    vocab = len(tokenizer)
    out = []
    for length in lengths:
        ids = [tokenizer.bos_token_id] + [rng.randrange(4, vocab) for _ in range(length - 1)]
        reset_peak(device)
        sync(device)
        started = time.perf_counter()
        graph = attribute(net, tokenizer, ids, max_feature_nodes=FEATURE_BUDGET)
        sync(device)
        out.append({"prompt_tokens": length, "seconds": time.perf_counter() - started,
                    "peak_memory_gb": peak_memory_gb(device), "active_features": int(graph.info["n_active"]),
                    "feature_rows": int(len(graph.selected_features))})
        del graph
    return out


def compare_precision(store_low: Path, store_high: Path) -> dict:
    """Stored activations of the same tokens under two dtypes, joined on (layer, feature, seq_id, pos)."""
    import duckdb

    import featurestore as fs

    query = "SELECT layer, feature, seq_id, pos, act FROM activations WHERE source = 'transcoder'"
    low = fs.open(store_low).sql(query).to_arrow_table()
    high = fs.open(store_high).sql(query).to_arrow_table()
    con = duckdb.connect()
    con.register("low", low)
    con.register("high", high)
    row = con.sql("""
        SELECT count(*) FILTER (WHERE low.act IS NULL), count(*) FILTER (WHERE high.act IS NULL),
               count(*) FILTER (WHERE low.act IS NOT NULL AND high.act IS NOT NULL),
               count(*) FILTER (WHERE low.act IS NOT NULL AND high.act IS NOT NULL AND low.act <> high.act),
               max(abs(coalesce(low.act, 0) - coalesce(high.act, 0))),
               max(abs(low.act - high.act) / greatest(abs(high.act), 1e-6)),
               max(greatest(coalesce(low.act, 0), coalesce(high.act, 0)))
        FROM low FULL OUTER JOIN high USING (layer, feature, seq_id, pos)""").fetchall()[0]
    only_high, only_low, both, differ, max_abs, max_rel, largest = row
    return {"only_in_float32": int(only_high), "only_in_low_precision": int(only_low), "in_both": int(both),
            "differ": int(differ), "max_abs_difference": float(max_abs or 0.0),
            "max_relative_difference": float(max_rel or 0.0), "largest_activation": float(largest or 0.0)}


# ---------------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a tiny shape in float32, the same code (for CPU and tests)")
    parser.add_argument("--rows", type=int, default=None, help="synthetic traces collected per run")
    parser.add_argument("--trace-tokens", type=int, default=None, help="mean trace length in tokens")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per forward batch (collect's default)")
    parser.add_argument("--writer-threads", type=int, default=None, help="collect's writer threads (default: collect's)")
    parser.add_argument("--legacy", action="store_true",
                        help="also measure the old transfer path (blocking copies, one writer thread), for before/after")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: neurons,attribution,precision")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one, removed)")
    args = parser.parse_args(argv)

    from featurestore.collect_options import CollectOptions
    from featurestore.demo import build_tokenizer

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: CUDA is not available here; run with --device cpu --tiny")
    shape = Shape(**(TINY if args.tiny else REAL))
    shape = replace(shape, rows=args.rows or shape.rows, trace_tokens=args.trace_tokens or shape.trace_tokens)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    dtype = torch.float32 if args.tiny else torch.bfloat16
    work = args.work or Path(tempfile.mkdtemp(prefix="fs-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"device": args.device, "device_name": _device_name(args.device), "tiny": args.tiny,
                    "shape": shape.__dict__ | {"attribution_lengths": list(shape.attribution_lengths)},
                    "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__}
    try:
        tokenizer = build_tokenizer(work / "tokenizer")
        data = work / "traces.jsonl"
        report["data_tokens"] = synthetic_traces(data, shape.rows, shape.trace_tokens, tokenizer)
        _say(f"{shape.rows} traces, {report['data_tokens']:,} tokens; building the model on {args.device}")
        net, config = build_model(shape, tokenizer, args.device, dtype)
        ckpt = checkpoint_stub(config, work)
        report["parameters"] = sum(p.numel() for p in net.parameters())
        calibration = _calibration_batches(tokenizer, data, args.device, 4 if args.tiny else 2)
        opts = CollectOptions(device=args.device, dtype=report["dtype"], batch_tokens=args.batch_tokens,
                              chunk_size=max(1, shape.rows // 2), progress=False)
        if args.writer_threads:
            opts = replace(opts, writer_threads=args.writer_threads)
        report["bare_forward_seconds"] = bare_forward_seconds(net, tokenizer, data, opts, args.device)  # warm-up
        report["collection"] = {}
        for l0 in L0_TARGETS:
            reached = calibrate_l0(net, calibration, l0)
            _say(f"L0 target {l0}: calibrated, mean {sum(reached) / len(reached):.2f} per layer")
            runs = {"default": opts} | ({"legacy": replace(opts, writer_threads=1, pinned_transfers=False)} if args.legacy else {})
            for name, run_opts in runs.items():
                result = run_collection(net, ckpt, tokenizer, data, work / f"store-l0-{l0}-{name}", run_opts, args.device)
                result["calibrated_l0"] = reached
                report["collection"][f"l0={l0}" + ("" if name == "default" else f" ({name})")] = result
                _say(f"  collect ({name}): ratio {result['ratio']:.2f}, {result['tokens_per_s']:,.0f} tok/s")
        if "neurons" not in skip:
            # adapters on: the capture cost is the same, and the model in memory stays whole for the later sections
            neuron_opts = replace(opts, source="neuron", neurons_per_layer=NEURONS_PER_LAYER, adapters="on")
            report["neurons"] = run_collection(net, ckpt, tokenizer, data, work / "store-neurons", neuron_opts, args.device)
            report["neurons"]["neurons_per_layer"] = min(NEURONS_PER_LAYER, shape.d_mlp)
            _say(f"neurons: ratio {report['neurons']['ratio']:.2f}")
        if "attribution" not in skip:
            report["attribution"] = run_attribution(net, tokenizer, shape.attribution_lengths, args.device)
            _say("attribution: " + ", ".join(f"{a['prompt_tokens']} tok {a['seconds']:.1f} s" for a in report["attribution"]))
        if "precision" not in skip:
            report["precision"] = _precision(net, ckpt, tokenizer, data, work, opts, shape, args.device, dtype)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["total_seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    print(f"wrote {args.out}")
    return report


def _precision(net, ckpt, tokenizer, data: Path, work: Path, opts, shape: Shape, device: str, dtype: torch.dtype) -> dict:
    """The first rows collected in the run's dtype and again in float32 (the model converted in place: last step)."""
    from featurestore.collection import collect_loaded

    sliced = replace(opts, max_samples=shape.precision_rows)
    stores = {}
    if dtype == torch.float32:
        low = replace(sliced, dtype="bfloat16")
        net.to(torch.bfloat16)
        stores["low"] = collect_loaded(net, ckpt, tokenizer, str(data), work / "precision-low", low).path
        net.to(torch.float32)
        stores["high"] = collect_loaded(net, ckpt, tokenizer, str(data), work / "precision-high", sliced).path
    else:
        stores["low"] = collect_loaded(net, ckpt, tokenizer, str(data), work / "precision-low", sliced).path
        net.to(torch.float32)
        stores["high"] = collect_loaded(net, ckpt, tokenizer, str(data), work / "precision-high",
                                        replace(sliced, dtype="float32")).path
    result = compare_precision(stores["low"], stores["high"])
    result["rows"] = shape.precision_rows
    return result


def _calibration_batches(tokenizer, data: Path, device: str, n: int) -> list[torch.Tensor]:
    from featurestore.data import adds_special_tokens, format_text, open_dataset

    dataset = open_dataset(str(data))
    batches = []
    for row in dataset.rows(0, min(n, len(dataset))):
        text = format_text(row, "deepseek", tokenizer)
        ids = tokenizer(text, add_special_tokens=adds_special_tokens("deepseek"))["input_ids"][:2048]
        batches.append(torch.tensor([ids], dtype=torch.long, device=device))
    return batches


def _device_name(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return "cpu"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def format_table(report: dict) -> str:
    mem = "GPU GiB" if report["device"].startswith("cuda") else "RSS GiB"
    lines = [f"{report['device_name']}, {report['parameters']:,} parameters ({report['dtype']}), "
             f"{report['data_tokens']:,} tokens; bare forward (first, warm-up) {report['bare_forward_seconds']:.2f} s",
             f"{'run':<22}{'ratio':>7}{'tok/s':>11}{'act/s':>13}{'act/tok/layer':>15}{mem:>9}{'transfer':>10}{'writer':>8}"]
    runs = dict(report["collection"]) | ({"neurons (500/layer)": report["neurons"]} if "neurons" in report else {})
    for name, r in runs.items():
        lines.append(f"{name:<22}{r['ratio']:>7.2f}{r['tokens_per_s']:>11,.0f}{r['activations_per_s']:>13,.0f}"
                     f"{r['activations_per_token_per_layer']:>15.2f}{r['peak_memory_gb']:>9.1f}"
                     f"{r['transfer_share']:>10.1%}{r['writer_wait_share']:>8.1%}")
    for a in report.get("attribution", []):
        lines.append(f"attribution {a['prompt_tokens']:>5} tokens: {a['seconds']:.1f} s, {mem} {a['peak_memory_gb']:.1f}, "
                     f"{a['active_features']:,} active features")
    if "precision" in report:
        p = report["precision"]
        lines.append(f"{report['dtype'] if report['dtype'] != 'float32' else 'bfloat16'} vs float32 on {p['rows']} traces: "
                     f"{p['differ']:,} of {p['in_both']:,} shared activations differ (max abs {p['max_abs_difference']:.3g}, "
                     f"max rel {p['max_relative_difference']:.3g}); {p['only_in_float32']:,} only in float32, "
                     f"{p['only_in_low_precision']:,} only in low precision")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
