"""Every table the store writes: its Arrow schema and where its files live. The single source of truth.

Paths are relative to the store directory. Partitioned tables put their partition columns in the path
(hive style: ``source=transcoder/layer=3``) and not in the files.
"""
from __future__ import annotations

import pyarrow as pa

FORMAT_VERSION = 1
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

LOGIT_LENS = pa.schema([  # partitioned by source, layer
    pa.field("feature", pa.int32(), nullable=False),
    pa.field("side", pa.string(), nullable=False),  # top | bottom
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("token_id", pa.int32(), nullable=False),
    pa.field("value", pa.float32(), nullable=False),
])

PARTITION_TYPES = {"source": "VARCHAR", "layer": "INTEGER"}


def partition_dir(table: str, source: str, layer: int) -> str:
    return f"{table}/source={source}/layer={layer}"


def chunk_name(chunk: int, part: int | None = None) -> str:
    return f"chunk-{chunk:06d}.parquet" if part is None else f"chunk-{chunk:06d}-{part:03d}.parquet"


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()
