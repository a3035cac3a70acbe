"""Every table the store writes: its Arrow schema and where its files live. The single source of truth.

Paths are relative to the store directory. Partitioned tables put their partition columns in the path
(hive style: ``source=transcoder/layer=3``) and not in the files.
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 2  # 2: files carry size and sha256 in the manifest; layers may be compacted
READABLE_VERSIONS = (1, 2)  # version 1 stores open (files unverified) and `featurestore check --upgrade` hashes them
MANIFEST = "featurestore.json"

REGIONS = ("bos", "user_marker", "question", "assistant_marker", "think_start", "thinking", "think_end", "answer", "unknown")
SOURCES = ("transcoder", "neuron")

VOCAB_FILE = "vocab.parquet"
VOCAB = pa.schema([
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("token", pa.string(), nullable=False),  # display text; bytes of partial UTF-8 as lowercase \xNN
    pa.field("raw", pa.binary()),  # the token's bytes (byte-level BPE), null when not recoverable
    pa.field("partial_utf8", pa.bool_(), nullable=False),
    pa.field("special", pa.bool_(), nullable=False),
])

SEQUENCES = pa.schema([
    pa.field("seq_id", pa.int32(), nullable=False),  # = row index in the dataset (stable across runs and skips)
    pa.field("domain", pa.string()),
    pa.field("source", pa.string()),  # the dataset row's source (not the activation source)
    pa.field("n_tokens", pa.int32(), nullable=False),
    pa.field("truncated", pa.bool_(), nullable=False),
    pa.field("complete", pa.bool_(), nullable=False),  # both <think> and </think> present after truncation
    pa.field("bos", pa.int32()),
    pa.field("user_marker", pa.int32()),
    pa.field("assistant_marker", pa.int32()),
    pa.field("think_start", pa.int32()),
    pa.field("think_end", pa.int32()),
])

TOKENS = pa.schema([
    pa.field("seq_id", pa.int32(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("region", pa.dictionary(pa.int8(), pa.string()), nullable=False),
    pa.field("thinking_pos", pa.float32()),  # (pos-ts-1)/(te-ts-1) inside thinking; null elsewhere or if te missing
])

ACTIVATIONS = pa.schema([  # partitioned by source, layer; sorted by (feature, seq_id, pos) within a file
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("seq_id", pa.int32(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("act", pa.float32(), nullable=False),
])

FEATURE_STATS = pa.schema([  # per chunk, partitioned by source, layer: what the features view sums up
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("n_active", pa.int64(), nullable=False),  # exact count of act > 0 over all tokens of the chunk
    pa.field("sum_act", pa.float64(), nullable=False),  # sum of the positive activations
    pa.field("max_act", pa.float32(), nullable=False),
])

NEURON_WINDOWS = pa.schema([  # neurons only, per chunk, partitioned by source, layer: see featurestore/neuron_windows.py
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("seq_id", pa.int32(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),  # the example's token
    pa.field("act", pa.float32(), nullable=False),
    pa.field("top", pa.bool_(), nullable=False),  # among the chunk's top activations of this neuron
    pa.field("sample_key", pa.int64()),  # among the chunk's uniform sample of positive activations: its key; else null
    pa.field("start", pa.int32(), nullable=False),  # position of acts[0]
    pa.field("acts", pa.list_(pa.float32()), nullable=False),  # the neuron's true activation at every window token
])

NEURON_COUNTS = pa.schema([  # neurons only, per chunk, partitioned by source, layer: see featurestore/neuron_counts.py
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # domain | region | bin
    pa.field("key", pa.string(), nullable=False),  # the domain, the region name, or the thinking bin 0-9
    pa.field("n_active", pa.int64(), nullable=False),  # exact count of act > 0 over the chunk's tokens of that key
])

LOGIT_LENS = pa.schema([  # partitioned by source, layer
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("side", pa.string(), nullable=False),  # top | bottom
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("value", pa.float32(), nullable=False),
])

ACTIVATION_ROW_GROUP = 65536
TOKENS_ROW_GROUP = 65536  # ~13 traces of 5,000 tokens: a window lookup reads the groups of its sequences only
# Activation files (chunks and compacted): no dictionary pages (the values are mostly unique, so a dictionary only
# costs) and delta-packed integer columns (sorted features and near-sorted positions pack to a few bits). Measured
# on a full-width layer: 6.0 instead of 7.7 bytes per row, 3.5x faster to write, DuckDB reads as fast.
ACTIVATION_PARQUET = {"compression": "zstd", "use_dictionary": False,
                      "column_encoding": {name: "DELTA_BINARY_PACKED" for name in ("feature", "seq_id", "pos")}}

PARTITION_TYPES = {"source": "VARCHAR", "layer": "INTEGER"}


def partition_dir(table: str, source: str, layer: int) -> str:
    return f"{table}/source={source}/layer={layer}"


def chunk_name(chunk: int, part: int | None = None) -> str:
    return f"chunk-{chunk:06d}.parquet" if part is None else f"chunk-{chunk:06d}-{part:03d}.parquet"


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


# ---- interp: LLM-judge results, one directory per table and run (interp/<table>/run=<run_id>/part-*.parquet).
# Files are written atomically as results complete; a row is never rewritten (a resumed run appends).
INTERP_TABLES = ("runs", "classifications", "explanations", "detection_scores", "detection_examples", "requests",
                 "scorer_scores", "scorer_examples")


def _interp_common() -> list[pa.Field]:
    return [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("feature", pa.int32(), nullable=False),
    ]


def _interp_outcome() -> list[pa.Field]:
    return [
        pa.field("status", pa.string(), nullable=False),  # ok | error | skipped
        pa.field("error", pa.string()),
        pa.field("judge_model", pa.string(), nullable=False),
        pa.field("base_url_host", pa.string(), nullable=False),
        pa.field("prompt_version", pa.string(), nullable=False),
        pa.field("n_requests", pa.int32(), nullable=False),  # HTTP requests made, retries included
        pa.field("prompt_tokens", pa.int64()),
        pa.field("completion_tokens", pa.int64()),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]


INTERP_EXAMPLE = pa.struct([("seq_id", pa.int32()), ("pos", pa.int32()), ("act", pa.float32())])

INTERP_RUNS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # classify | autointerp
    pa.field("settings_hash", pa.string(), nullable=False),  # what makes a run resumable
    pa.field("judge_model", pa.string(), nullable=False),
    pa.field("base_url_host", pa.string(), nullable=False),
    pa.field("prompt_version", pa.string(), nullable=False),
    pa.field("settings", pa.string(), nullable=False),  # JSON of every option of the invocation
    pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

INTERP_CLASSIFICATIONS = pa.schema(_interp_common() + [
    pa.field("category", pa.string()),  # language | domain | reasoning | uninterpretable
    pa.field("confidence", pa.string()),  # high | medium | low
    pa.field("domain_type", pa.string()),  # math | science | code (category domain only)
    pa.field("mechanism", pa.string()),  # output | input_simple | input_abstract (category reasoning only)
    pa.field("category_description", pa.string()),
    pa.field("mechanism_description", pa.string()),
    pa.field("input_pattern", pa.string()),
    pa.field("output_pattern", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("n_examples", pa.int32()),  # examples shown to the judge
    pa.field("activation_freq", pa.float64()),
] + _interp_outcome())

INTERP_EXPLANATIONS = pa.schema(_interp_common() + [
    pa.field("description", pa.string()),
    pa.field("reasoning", pa.string()),
    pa.field("explain_examples", pa.list_(INTERP_EXAMPLE)),  # exactly what the explainer saw
    pa.field("n_examples", pa.int32()),
    pa.field("activation_freq", pa.float64()),
] + _interp_outcome())

INTERP_DETECTION_SCORES = pa.schema(_interp_common() + [
    pa.field("condition", pa.string(), nullable=False),  # top | lower (held-out positives from those pools)
    pa.field("control", pa.bool_(), nullable=False),  # scored with another feature's description
    pa.field("description_layer", pa.int32()),  # whose description was scored
    pa.field("description_feature", pa.int32()),
    pa.field("n_positives", pa.int32()),
    pa.field("n_negatives", pa.int32()),
    pa.field("tp", pa.int32()),
    pa.field("fp", pa.int32()),
    pa.field("tn", pa.int32()),
    pa.field("fn", pa.int32()),
    pa.field("accuracy", pa.float64()),
    pa.field("balanced_accuracy", pa.float64()),
    pa.field("precision", pa.float64()),
    pa.field("recall", pa.float64()),
    pa.field("f1", pa.float64()),
] + _interp_outcome())

INTERP_DETECTION_EXAMPLES = pa.schema(_interp_common() + [
    pa.field("condition", pa.string(), nullable=False),
    pa.field("control", pa.bool_(), nullable=False),
    pa.field("item", pa.int16(), nullable=False),  # the excerpt number shown to the judge
    pa.field("seq_id", pa.int32(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),  # positive: the activating token; negative: the window's anchor
    pa.field("window_start", pa.int32(), nullable=False),  # first and last position shown (inclusive)
    pa.field("window_end", pa.int32(), nullable=False),
    pa.field("label", pa.bool_(), nullable=False),  # true = a positive (the feature fires at pos)
    pa.field("act", pa.float32(), nullable=False),  # activation at pos (0 for negatives)
    pa.field("match", pa.string()),  # negatives: domain+region | domain | any (how closely they match)
    pa.field("prediction", pa.bool_()),  # null when the request failed
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

# Scorers beyond detection (fuzzing, embedding): one row per feature, scorer, condition and control; the
# answering model is judge_model/base_url_host of the row (the scorer's or the embeddings model, not the explainer).
INTERP_SCORER_SCORES = pa.schema(_interp_common() + [
    pa.field("scorer", pa.string(), nullable=False),  # fuzzing | embedding
    pa.field("condition", pa.string(), nullable=False),  # top | lower
    pa.field("control", pa.bool_(), nullable=False),
    pa.field("description_layer", pa.int32()),
    pa.field("description_feature", pa.int32()),
    pa.field("n_positives", pa.int32()),  # fuzzing: correctly marked excerpts; embedding: activating windows
    pa.field("n_negatives", pa.int32()),  # fuzzing: wrongly marked excerpts; embedding: verified all-zero windows
    pa.field("tp", pa.int32()),
    pa.field("fp", pa.int32()),
    pa.field("tn", pa.int32()),
    pa.field("fn", pa.int32()),
    pa.field("accuracy", pa.float64()),
    pa.field("balanced_accuracy", pa.float64()),
    pa.field("precision", pa.float64()),
    pa.field("recall", pa.float64()),
    pa.field("f1", pa.float64()),
    pa.field("auroc", pa.float64()),  # embedding only
    pa.field("score", pa.float64()),  # the headline: balanced accuracy (fuzzing) or AUROC (embedding)
    pa.field("ci_low", pa.float64()),  # 95% stratified bootstrap interval of score over this feature's items
    pa.field("ci_high", pa.float64()),
] + _interp_outcome())

INTERP_SCORER_EXAMPLES = pa.schema(_interp_common() + [
    pa.field("scorer", pa.string(), nullable=False),
    pa.field("condition", pa.string(), nullable=False),
    pa.field("control", pa.bool_(), nullable=False),
    pa.field("item", pa.int16(), nullable=False),  # the excerpt number shown (fuzzing) or the input index (embedding)
    pa.field("seq_id", pa.int32(), nullable=False),
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("window_start", pa.int32(), nullable=False),
    pa.field("window_end", pa.int32(), nullable=False),
    pa.field("label", pa.bool_(), nullable=False),  # fuzzing: the marking is correct; embedding: an activating window
    pa.field("marks", pa.list_(pa.int32())),  # fuzzing: the marked positions
    pa.field("act", pa.float32(), nullable=False),
    pa.field("prediction", pa.bool_()),  # fuzzing: the judge called the marking correct; null when it failed
    pa.field("similarity", pa.float64()),  # embedding: cosine similarity to the description
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

INTERP_REQUESTS = pa.schema([  # every HTTP request of every judge call, for audit and re-scoring
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("layer", pa.int32(), nullable=False),
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("purpose", pa.string(), nullable=False),  # classify | explain | detect:top | detect:lower | control:top | ...
    pa.field("attempt", pa.int16(), nullable=False),  # 1.. within (feature, purpose)
    pa.field("request_zstd", pa.binary(), nullable=False),  # zstd(JSON body sent; no headers, no key)
    pa.field("response_zstd", pa.binary()),  # zstd(raw response body), null when none arrived
    pa.field("http_status", pa.int16()),
    pa.field("outcome", pa.string(), nullable=False),  # ok | invalid | retry | failed
    pa.field("error", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("latency_s", pa.float32()),
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

INTERP_SCHEMAS = {
    "runs": INTERP_RUNS,
    "classifications": INTERP_CLASSIFICATIONS,
    "explanations": INTERP_EXPLANATIONS,
    "detection_scores": INTERP_DETECTION_SCORES,
    "detection_examples": INTERP_DETECTION_EXAMPLES,
    "requests": INTERP_REQUESTS,
    "scorer_scores": INTERP_SCORER_SCORES,
    "scorer_examples": INTERP_SCORER_EXAMPLES,
}


def interp_dir(table: str, run_id: str) -> str:
    return f"interp/{table}/run={run_id}"


# ---- graphs: RelP attribution graphs (attribution.store_output), one file per graph and table:
# graphs/<table>/<slug>.parquet, plus the raw compact adjacency as graphs/adjacency/<slug>.npz.zst.
# Nodes and links are the pruned graph the viewer shows; the adjacency keeps every computed edge.
GRAPH_META = pa.schema([
    pa.field("slug", pa.string(), nullable=False),
    pa.field("run_name", pa.string(), nullable=False),
    pa.field("prompt_file", pa.string()),
    pa.field("prompt", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.list_(pa.string()), nullable=False),  # decoded one token at a time
    pa.field("input_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("model_name", pa.string()),
    pa.field("injection", pa.string(), nullable=False),  # encoder-input | layer-input
    pa.field("scan", pa.string(), nullable=False),
    pa.field("node_threshold", pa.float64(), nullable=False),
    pa.field("edge_threshold", pa.float64(), nullable=False),
    pa.field("n_active", pa.int64(), nullable=False),  # active features of the prompt (BOS included)
    pa.field("n_feature_rows", pa.int32(), nullable=False),  # features whose incoming edges were computed
    pa.field("n_nodes", pa.int32(), nullable=False),  # after pruning
    pa.field("n_links", pa.int32(), nullable=False),
    pa.field("logit_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("logit_tokens", pa.list_(pa.string()), nullable=False),
    pa.field("logit_probabilities", pa.list_(pa.float32()), nullable=False),
    pa.field("top_token_id", pa.int32(), nullable=False),
    pa.field("target_token_id", pa.int32()),  # the prompt file's last token; null for API prompts without one
    pa.field("target_probability", pa.float32()),
    pa.field("target_rank", pa.int32()),
    pa.field("bos_excluded", pa.bool_(), nullable=False),
    pa.field("adjacency_file", pa.string(), nullable=False),  # relative to the store root
    pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
])

GRAPH_NODES = pa.schema([
    pa.field("slug", pa.string(), nullable=False),
    pa.field("node_id", pa.string(), nullable=False),  # the viewer's id: {l}_{f}_{p}, E_{tok}_{p}, {L+1}_{tok}_{p}
    pa.field("kind", pa.string(), nullable=False),  # feature | embedding | logit
    pa.field("layer", pa.int32()),  # features only
    pa.field("feature", pa.int32()),  # features only (index within the layer)
    pa.field("pos", pa.int32(), nullable=False),
    pa.field("token_id", pa.int32()),  # embedding: the input token; logit: the predicted token
    pa.field("activation", pa.float32()),
    pa.field("influence", pa.float32()),  # cumulative influence share at the node's rank (smaller = more important)
    pa.field("token_prob", pa.float32()),  # logits only
    pa.field("is_target_logit", pa.bool_(), nullable=False),
    pa.field("clerp", pa.string()),
])

GRAPH_LINKS = pa.schema([
    pa.field("slug", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # node_id
    pa.field("target", pa.string(), nullable=False),
    pa.field("weight", pa.float32(), nullable=False),  # raw signed direct effect
    pa.field("source_kind", pa.string(), nullable=False),
    pa.field("source_layer", pa.int32()),
    pa.field("source_feature", pa.int32()),
    pa.field("source_pos", pa.int32(), nullable=False),
    pa.field("target_kind", pa.string(), nullable=False),
    pa.field("target_layer", pa.int32()),
    pa.field("target_feature", pa.int32()),
    pa.field("target_token_id", pa.int32()),  # logit targets only
    pa.field("target_pos", pa.int32(), nullable=False),
])

GRAPH_TABLES = {"graphs": ("graphs/meta", GRAPH_META), "graph_nodes": ("graphs/nodes", GRAPH_NODES),
                "graph_links": ("graphs/links", GRAPH_LINKS)}
GRAPH_ADJACENCY_DIR = "graphs/adjacency"
