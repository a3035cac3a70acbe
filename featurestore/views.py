"""Every DuckDB view over the store, defined once; the Python API and ``featurestore sql`` both use these.

Chunked tables are read from the files the manifest lists as committed (never by globbing), with the
hive partition columns typed explicitly. Tables written one whole file at a time by other writers
(interp, graphs) are registered in ``GLOB_VIEWS`` and read by glob.
"""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from . import schema, storage
from .manifest import Manifest

_DUCK_TYPES = {
    pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
    pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.string(): "VARCHAR", pa.bool_(): "BOOLEAN",
    pa.binary(): "BLOB", pa.large_string(): "VARCHAR", pa.timestamp("us"): "TIMESTAMP",
    pa.list_(pa.float32()): "FLOAT[]",
}

RANDOM_ORDER_SQL = "hash(seq_id, pos, feature, {seed}::BIGINT), seq_id, pos"
"""The seeded order behind "random samples": the same store and seed give the same samples everywhere."""

# name -> (glob relative to the store root, pyarrow schema); for tables written whole-file by other modules.
GLOB_VIEWS: dict[str, tuple[str, pa.Schema]] = {}
GLOB_VIEWS.update({name: (f"{folder}/*.parquet", s) for name, (folder, s) in schema.GRAPH_TABLES.items()})


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _duck_type(t.value_type)
    return _DUCK_TYPES.get(t, "VARCHAR")


def empty_select(columns: dict[str, str]) -> str:
    cols = ", ".join(f"CAST(NULL AS {typ}) AS {name}" for name, typ in columns.items())
    return f"SELECT {cols} WHERE false"


def schema_columns(s: pa.Schema, partitioned: bool = False) -> dict[str, str]:
    cols = dict(schema.PARTITION_TYPES) if partitioned else {}
    return cols | {f.name: _duck_type(f.type) for f in s}


def sql_list(paths: list[str]) -> str:
    return "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in paths) + "]"


def parquet_scan(files: list[str], partitioned: bool) -> str:
    types = ", ".join(f"'{k}': {v}" for k, v in schema.PARTITION_TYPES.items())
    hive = f", hive_partitioning = true, hive_types = {{{types}}}" if partitioned else ""
    return f"read_parquet({sql_list(files)}{hive})"


def _table_select(manifest: Manifest, table: str, s: pa.Schema, partitioned: bool, source: str | None = None) -> str:
    files = [str(manifest.root / f) for f in manifest.files(table, source)]
    columns = schema_columns(s, partitioned)
    if not files:
        return empty_select(columns)
    return f"SELECT {', '.join(columns)} FROM {parquet_scan(files, partitioned)}"


def activation_scan(manifest: Manifest, source: str, layer: int) -> str:
    """A FROM clause over one layer's activation files: what per-feature queries use (pruned up front)."""
    prefix = schema.partition_dir("activations", source, layer) + "/"
    files = [str(manifest.root / f) for f in manifest.files("activations", source) if f.startswith(prefix)]
    if not files:
        return f"({empty_select(schema_columns(schema.ACTIVATIONS))})"
    return f"read_parquet({sql_list(files)})"


def token_files(manifest: Manifest, seq_ids) -> list[str]:
    """The ``tokens`` files (relative paths) that can hold any of ``seq_ids``: each chunk, and the compacted tokens
    file, records its [first, last + 1) sequences, so a window lookup opens a few files, not one per chunk."""
    wanted = _unique_ids(seq_ids)
    rels = []
    compacted = manifest.data.get("compacted_tokens") or {}
    for rel, (first, stop) in zip(compacted.get("files", []), compacted.get("rows", [])):
        if np.searchsorted(wanted, first) < np.searchsorted(wanted, stop):  # some wanted id in [first, stop)
            rels.append(rel)
    for record in sorted(manifest.chunks, key=lambda c: (c["chunk"], c["source"])):
        first, stop = record.get("rows") or (0, 1 << 62)  # a record without its range: always read
        if np.searchsorted(wanted, first) < np.searchsorted(wanted, stop):
            rels.extend(record["files"].get("tokens", []))
    return rels


def _unique_ids(seq_ids) -> np.ndarray:
    return np.unique(np.asarray(list(seq_ids) if not isinstance(seq_ids, np.ndarray) else seq_ids, dtype=np.int64))


def sequence_tokens(manifest: Manifest, seq_ids, columns: list[str]) -> pa.Table:
    """``tokens`` rows of these sequences, ordered by (seq_id, pos), read from only the row groups whose seq_id
    statistics can hold them. DuckDB prunes an ``IN`` list by its minimum and maximum alone, so a feature's examples,
    spread over the store's sequences, would read every row group of the tokens file."""
    wanted = _unique_ids(seq_ids)
    tables = []
    for rel in token_files(manifest, wanted):
        file = storage.open_parquet(manifest.root / rel)
        meta, index = file.metadata, file.schema_arrow.get_field_index("seq_id")
        groups = []
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(index).statistics
            if stats is None or not stats.has_min_max or \
                    np.searchsorted(wanted, stats.min) < np.searchsorted(wanted, stats.max, side="right"):
                groups.append(group)
        if groups:
            table = file.read_row_groups(groups, columns=columns)
            seq = table.column("seq_id").to_numpy()
            if len(seq) > 1 and bool((seq[1:] >= seq[:-1]).all()):  # a sorted file: each sequence is one slice
                starts, stops = np.searchsorted(seq, wanted), np.searchsorted(seq, wanted, side="right")
                tables.extend(table.slice(a, b - a) for a, b in zip(starts.tolist(), stops.tolist()) if b > a)
            else:
                tables.append(table.filter(pa.array(np.isin(seq, wanted))))
    if not tables:
        return schema.empty_table(pa.schema([schema.TOKENS.field(name) for name in columns]))
    table = pa.concat_tables(tables)
    seq, pos = table.column("seq_id").to_numpy(), table.column("pos").to_numpy()
    key = (seq.astype(np.int64) << 32) | pos.astype(np.int64)
    return table if len(key) < 2 or bool((key[1:] > key[:-1]).all()) else \
        table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])


def tokens_select(manifest: Manifest) -> str:
    """The ``tokens`` view: the raw rows with ``token`` (from the vocabulary) and ``region`` as text."""
    raw = _table_select(manifest, "tokens", schema.TOKENS, False)
    return f"""SELECT t.seq_id, t.pos, t.token_id, v.token, t.region::VARCHAR AS region, t.thinking_pos
        FROM ({raw}) t LEFT JOIN vocab v USING (token_id)"""


def connect(manifest: Manifest) -> duckdb.DuckDBPyConnection:
    """A connection with every view. Store files are immutable (a rewrite gets a new name), so their Parquet footers
    are cached across queries: a compacted layer of 250M rows has thousands of row groups, whose footer would
    otherwise be parsed again by every per-feature query."""
    con = duckdb.connect()
    con.execute("SET parquet_metadata_cache = true")
    register(con, manifest)
    return con


def register(con: duckdb.DuckDBPyConnection, manifest: Manifest) -> None:
    root = manifest.root
    if storage.is_remote(root):
        storage.register_duckdb(con, root)
    vocab = root / schema.VOCAB_FILE
    vocab_sql = f"SELECT * FROM read_parquet('{vocab}')" if vocab.exists() else empty_select(schema_columns(schema.VOCAB))
    con.execute(f"CREATE OR REPLACE VIEW vocab AS {vocab_sql}")
    con.execute(f"CREATE OR REPLACE VIEW sequences AS {_table_select(manifest, 'sequences', schema.SEQUENCES, False)}")
    con.execute(f"CREATE OR REPLACE VIEW tokens AS {tokens_select(manifest)}")
    con.execute(f"CREATE OR REPLACE VIEW activations AS {_table_select(manifest, 'activations', schema.ACTIVATIONS, True)}")
    con.execute(f"CREATE OR REPLACE VIEW feature_stats AS {_table_select(manifest, 'feature_stats', schema.FEATURE_STATS, True)}")
    con.execute(f"CREATE OR REPLACE VIEW neuron_windows AS "  # neurons' example windows (featurestore/neuron_windows.py)
                f"{_table_select(manifest, 'neuron_windows', schema.NEURON_WINDOWS, True)}")
    con.execute(f"""CREATE OR REPLACE VIEW logit_lens AS
        SELECT l.source, l.layer, l.feature, l.side, l.rank, l.token_id, v.token, l.value
        FROM ({_table_select(manifest, 'logit_lens', schema.LOGIT_LENS, True)}) l LEFT JOIN vocab v USING (token_id)""")
    totals = {}
    for record in manifest.chunks:
        totals[record["source"]] = totals.get(record["source"], 0) + record["n_tokens"]
    rows = ", ".join(f"('{s}', {n})" for s, n in sorted(totals.items()))
    source_tokens = f"SELECT * FROM (VALUES {rows}) t(source, n_tokens)" if rows else empty_select({"source": "VARCHAR", "n_tokens": "BIGINT"})
    con.execute(f"CREATE OR REPLACE VIEW source_tokens AS {source_tokens}")
    con.execute("""CREATE OR REPLACE VIEW features AS
        SELECT s.source, s.layer, s.feature, sum(s.n_active)::BIGINT AS activation_count,
               sum(s.n_active) / any_value(t.n_tokens) AS activation_freq,
               max(s.max_act) AS max_act, sum(s.sum_act) / sum(s.n_active) AS mean_act
        FROM feature_stats s JOIN source_tokens t USING (source)
        GROUP BY s.source, s.layer, s.feature HAVING sum(s.n_active) > 0""")
    for name, (pattern, s) in GLOB_VIEWS.items():
        register_glob_view(con, root, name, pattern, s)
    register_interp_views(con, root)


def register_glob_view(con: duckdb.DuckDBPyConnection, root: Path, name: str, pattern: str, s: pa.Schema) -> None:
    if any(root.glob(pattern)):
        select = f"SELECT * FROM read_parquet('{root / pattern}', union_by_name = true, hive_partitioning = true)"
    else:
        select = empty_select(schema_columns(s))
    con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")


# ---- interp (LLM judges): files under interp/<table>/run=<run_id>/, written by featurestore.interp.tables.
# A resumed run may append a newer row for a key that failed before: the views keep the latest row per key.
INTERP_VIEWS: dict[str, tuple[str, pa.Schema, tuple[str, ...] | None]] = {  # view -> (table, schema, key or None = raw)
    "interp_invocations": ("runs", schema.INTERP_RUNS, None),  # one row per invocation (interp_runs: per run)
    "interp_requests": ("requests", schema.INTERP_REQUESTS, None),  # every HTTP request, prompt/response zstd
    "classifications": ("classifications", schema.INTERP_CLASSIFICATIONS, ()),
    "explanations": ("explanations", schema.INTERP_EXPLANATIONS, ()),
    "detection_scores": ("detection_scores", schema.INTERP_DETECTION_SCORES, ("condition", "control")),
    "detection_examples": ("detection_examples", schema.INTERP_DETECTION_EXAMPLES, ("condition", "control", "item")),
    "scorer_scores": ("scorer_scores", schema.INTERP_SCORER_SCORES, ("scorer", "condition", "control")),
    "scorer_examples": ("scorer_examples", schema.INTERP_SCORER_EXAMPLES, ("scorer", "condition", "control", "item")),
}


def register_interp_views(con: duckdb.DuckDBPyConnection, root: Path) -> None:
    for name, (table, s, key) in INTERP_VIEWS.items():
        columns = ", ".join(f'"{f.name}"' for f in s)
        pattern = f"interp/{table}/run=*/*.parquet"
        if not any(root.glob(pattern)):
            empty = ", ".join(f'CAST(NULL AS {_interp_type(f.type)}) AS "{f.name}"' for f in s)
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT {empty} WHERE false")
            continue
        path = str(root / pattern).replace("'", "''")
        select = f"SELECT {columns} FROM read_parquet('{path}', hive_partitioning = false)"
        if key is not None:
            partition = ", ".join(("run_id", "source", "layer", "feature") + key)
            select += f" QUALIFY row_number() OVER (PARTITION BY {partition} ORDER BY created_at DESC) = 1"
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {select}")
    con.execute(f"CREATE OR REPLACE VIEW interp_runs AS {INTERP_RUNS_SELECT}")


# One row per run: identity as first started, settings of the latest invocation, the invocations counted.
INTERP_RUNS_SELECT = """SELECT run_id, arg_min(kind, started_at) AS kind, arg_min(settings_hash, started_at) AS settings_hash,
        arg_min(judge_model, started_at) AS judge_model, arg_min(base_url_host, started_at) AS base_url_host,
        arg_min(prompt_version, started_at) AS prompt_version, arg_max(settings, started_at) AS settings,
        min(started_at) AS started_at, max(started_at) AS last_started_at, count(*)::BIGINT AS invocations
    FROM interp_invocations GROUP BY run_id"""


def _interp_type(t: pa.DataType) -> str:
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ"
    if pa.types.is_list(t) and pa.types.is_integer(t.value_type):
        return "INTEGER[]"
    if pa.types.is_list(t):
        return "STRUCT(seq_id INTEGER, pos INTEGER, act FLOAT)[]"
    return _duck_type(t)
