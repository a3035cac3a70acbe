"""RelP attribution: ours vs the per-feature-loop reference, and compact vs padded pruning memory (one run).

    python benchmarks/attribution.py [--checkpoint DIR] [--tokens 128] [--max-feature-nodes 10000] [--repeats 3]

Model: the demo checkpoint (built into --work if missing); a random model of the demo's size if the demo
builder is unavailable. Prompt: the first demo trace cut to --tokens tokens (random tokens otherwise).
Memory is peak resident memory above the level just before each measured call (Linux /proc VmHWM,
reset through /proc/self/clear_refs); on a CUDA device it is torch's peak allocation instead.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution import attribute, prune  # noqa: E402
from attribution.architectures import architecture_for  # noqa: E402
from attribution.reference import reference_rows  # noqa: E402
from featurestore.modeling import load_model, load_tokenizer  # noqa: E402


# ---- memory ---------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class PeakMemory:
    """Peak memory (MiB) of a block above the level when it started."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.mib = float("nan")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
            self.start = _status_kib("VmRSS")
        except OSError:
            self.start = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20
        elif self.start is not None:
            self.mib = (_status_kib("VmHWM") - self.start) / 1024


def timed(fn, device: str):
    """(result, wall seconds, peak MiB); CPU seconds of the process go to ``timed.cpu``."""
    with PeakMemory(device) as memory:
        started, cpu = time.perf_counter(), time.process_time()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    timed.cpu = time.process_time() - cpu
    return result, seconds, memory.mib


# ---- model and prompt -----------------------------------------------------------------------
def demo_or_random_checkpoint(work: Path) -> tuple[Path, str]:
    try:
        from featurestore.demo.checkpoint import build_demo_checkpoint

        return build_demo_checkpoint(work / "demo"), "demo checkpoint"
    except Exception as exc:  # the demo builder is optional for this script
        print(f"(demo checkpoint unavailable: {type(exc).__name__}: {exc}; using a random model of its size)")
    from transformers import Qwen2Config

    sys.path.insert(0, str(ROOT / "tests"))
    from test_attribution_support import randomise, save_tokenizer
    from featurestore.modeling import Qwen2ForCausalLMWithTranscoder

    path = work / "random"
    config = Qwen2Config(vocab_size=64, hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, transcoder_n_features=768, transcoder_dec_bias=False,
                         architectures=["Qwen2ForCausalLMWithTranscoder"], tie_word_embeddings=False)
    model = Qwen2ForCausalLMWithTranscoder(config)
    randomise(model, 0, zero_biases=False)
    model.save_pretrained(str(path))
    save_tokenizer(path)
    return path, "random model of the demo's size"


def prompt_ids(tokenizer, n_tokens: int) -> list[int]:
    traces = ROOT / "featurestore" / "demo" / "traces.jsonl"
    if traces.exists():
        row = json.loads(traces.read_text(encoding="utf-8").splitlines()[0])
        text = "<｜User｜>" + row["conversations"][0]["value"] + "<｜Assistant｜>" + row["conversations"][1]["value"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        bos = tokenizer.bos_token_id
        ids = ([bos] if bos is not None else []) + ids
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer) - 2, (n_tokens,), generator=generator).tolist()


# ---- pruning --------------------------------------------------------------------------------
def padded_circuit_tracer_prune(graph, n_layers: int):
    from circuit_tracer.attribution.targets import LogitTarget
    from circuit_tracer.graph import Graph, prune_graph
    from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

    n_sel, n_pos, n_err = graph.n_selected, graph.n_pos, n_layers * graph.n_pos
    size = n_sel + n_err + n_pos + graph.n_logits
    keep = torch.cat([torch.arange(n_sel), torch.arange(n_sel + n_err, size)])
    padded = torch.zeros(size, size)
    padded[keep[:, None], keep[None, :]] = graph.adjacency
    cfg = UnifiedConfig(n_layers=n_layers, d_model=1, d_head=1, n_heads=1, d_mlp=1, d_vocab=graph.vocab_size,
                        tokenizer_name="", model_name="", original_architecture="")
    ct_graph = Graph(input_string="", input_tokens=graph.input_tokens, active_features=graph.active_features,
                     adjacency_matrix=padded, cfg=cfg, selected_features=graph.selected_features,
                     activation_values=graph.activation_values,
                     logit_targets=[LogitTarget("", int(t)) for t in graph.logit_tokens],
                     logit_probabilities=graph.logit_probabilities, scan="bench")
    del padded
    return prune_graph(ct_graph, 0.8, 0.98), keep, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="model directory (default: the demo checkpoint)")
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "featurestore-bench"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--max-feature-nodes", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast paths (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, kind = (Path(args.checkpoint), "given checkpoint") if args.checkpoint else demo_or_random_checkpoint(work)
    model, info = load_model(str(checkpoint), dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(info.path)
    ids = prompt_ids(tokenizer, args.tokens)
    print(f"model: {kind} ({info.n_layers} layers, d_model {info.d_model}, {info.n_features} features), "
          f"{len(ids)}-token prompt, device {args.device}, {torch.get_num_threads()} CPU threads, {args.dtype}")

    options = dict(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    attribute(model, tokenizer, ids, **options)  # warm-up (vmap and allocator first use)
    runs, ours_cpu = [], []
    for _ in range(args.repeats):
        runs.append(timed(lambda: attribute(model, tokenizer, ids, **options), args.device))
        ours_cpu.append(timed.cpu)
    graph = runs[-1][0]
    ours_s = statistics.median(r[1] for r in runs)
    ours_mib = statistics.median(r[2] for r in runs)
    print(f"graph: {graph.info['n_active']} active features, {graph.n_selected} feature rows, {graph.n_logits} logits")

    arch = architecture_for(model)
    targets = [(l, p, arch.encoder(l).weight[f]) for l, p, f in graph.feature_nodes().tolist()]
    targets += [(arch.n_layers, len(ids) - 1, arch.unembed[t].float() - arch.unembed.float().mean(0))
                for t in graph.logit_tokens.tolist()]
    (rows, _), ref_s, ref_mib = timed(lambda: reference_rows(model, ids, targets, batch_size=args.batch_size, first_position=1), args.device)
    columns = torch.cat([graph.selected_features, graph.info["n_active"] + torch.arange(1, len(ids))])
    ours_rows = torch.cat([graph.adjacency[: graph.n_selected], graph.adjacency[-graph.n_logits:]])
    ours_rows = ours_rows[:, torch.cat([torch.arange(graph.n_selected), graph.n_selected + torch.arange(1, len(ids))])]
    ref_cpu = timed.cpu
    difference = (ours_rows - rows[:, columns]).abs().max().item()
    scale = rows.abs().max().item()

    print("\nattribution (same targets, same run)")
    ours_cpu_s = statistics.median(ours_cpu)
    print(f"  ours (transposed linear map, batched):        wall {ours_s:7.2f} s  cpu {ours_cpu_s:7.2f} s  "
          f"peak +{ours_mib:7.1f} MiB  (median of {args.repeats})")
    print(f"  reference (replicated batch, per-feature loop): wall {ref_s:7.2f} s  cpu {ref_cpu:7.2f} s  "
          f"peak +{ref_mib:7.1f} MiB")
    print(f"  speed-up {ref_s / ours_s:.1f}x wall, {ref_cpu / ours_cpu_s:.1f}x cpu; "
          f"max |edge difference| {difference:.2e} (largest edge {scale:.2e})")

    print("\npruning (node 0.8, edge 0.98)")
    compact = [timed(lambda: prune(graph.adjacency, graph.logit_probabilities, graph.n_selected, graph.n_pos), "cpu")
               for _ in range(args.repeats)]
    ours_prune = compact[-1][0]
    n_compact = graph.adjacency.shape[0]
    print(f"  compact [features|tokens|logits] N={n_compact}: {statistics.median(c[1] for c in compact):.3f} s, "
          f"peak +{statistics.median(c[2] for c in compact):.1f} MiB")
    for layers in sorted({info.n_layers, 4 * info.n_layers}):
        (result, keep, size), seconds, mib = timed(lambda: padded_circuit_tracer_prune(graph, layers), "cpu")
        same = torch.equal(result.node_mask[keep], ours_prune.node_mask) and \
            torch.equal(result.edge_mask[keep[:, None], keep[None, :]], ours_prune.edge_mask)
        print(f"  circuit-tracer padded with {layers} x {graph.n_pos} error nodes, N={size}: {seconds:.3f} s, "
              f"peak +{mib:.1f} MiB; same nodes and edges as compact: {same}")
        del result


if __name__ == "__main__":
    main()
