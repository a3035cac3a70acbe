"""The store reads behind feature documents: few, set-based statements per block of features.

A block is a run of live features of one (source, layer) holding about ``BLOCK_ROWS`` activations (sized from the
per-chunk statistics, so memory stays bounded whatever the store size). One ordered scan fetches all of the block's
activations with their seeded sample key; one more reads its logit lens. Selection and windows then run
vectorised in numpy (``feature_documents``), which measured far faster than per-block arg_min/quantile/range-join
SQL on the same data.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from featurestore import schema, views
from featurestore.errors import UserError

BLOCK_ROWS = 1_000_000  # activations per block: bounds memory, amortises each scan of the layer's files
# The packed row key (feature rank in the block << 51 | seq_id << 20 | pos) must stay within 63 bits of int64:
RANK_BITS, SEQ_BITS, POS_BITS = 12, 31, 20
MAX_BLOCK_FEATURES = 1 << RANK_BITS  # ranks 0..4095; larger layers are cut into more blocks


def random_key_sql(seed: int) -> str:
    """The seeded sample order of ``Feature.random_examples`` (ties broken by seq_id, pos, as there)."""
    return f"hash(seq_id, pos, feature, {int(seed)}::BIGINT)"


@dataclass
class BlockRows:
    """All activations of a block's features, ordered by (feature, seq_id, pos), plus their logit lens."""
    source: str
    layer: int
    features: np.ndarray  # (F,) live features present, ascending
    starts: np.ndarray  # (F+1,) row offsets of each feature's activations
    seq: np.ndarray  # (N,) int64
    pos: np.ndarray  # (N,) int64
    act: np.ndarray  # (N,) float32
    key: np.ndarray  # (N,) uint64 seeded sample key
    row_key: np.ndarray  # (N,) int64 packed by ``row_key`` (feature rank, seq_id, pos), ascending: for window lookups
    logits: dict  # (feature, side) -> token ids by rank
    total_tokens: int
    neuron: object = None  # neurons: exporters.neuron_examples.NeuronCandidates (rows are then window values)


def row_key(rank: np.ndarray, seq: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """(rank << 51) | (seq_id << 20) | pos as int64, refusing any part beyond its bits (which would overflow or
    collide silently)."""
    rank, seq, pos = (np.asarray(a, dtype=np.int64) for a in (rank, seq, pos))
    for name, values, bits in (("feature rank in a block", rank, RANK_BITS), ("seq_id", seq, SEQ_BITS),
                               ("token position", pos, POS_BITS)):
        if values.size and (int(values.max()) >= 1 << bits or int(values.min()) < 0):
            raise UserError(f"{name} {int(values.max()) if int(values.max()) >= 0 else int(values.min())} is outside "
                            f"0..{(1 << bits) - 1}, the range exports support")
    return (rank << (SEQ_BITS + POS_BITS)) | (seq << POS_BITS) | pos


def files_of(store, table: str, source: str, layer: int | None) -> list[str]:
    prefix = schema.partition_dir(table, source, layer) + "/" if layer is not None else ""
    return [str(store.path / f) for f in store.manifest_obj.files(table, source) if f.startswith(prefix)]


def tokens_scan(store) -> str:
    """A FROM clause over every raw ``tokens`` file."""
    files = [str(store.path / f) for f in store.manifest_obj.files("tokens")]
    if not files:
        return f"({views.empty_select({'seq_id': 'INTEGER', 'pos': 'INTEGER', 'token_id': 'INTEGER'})})"
    return views.parquet_scan(files, False)


def source_total_tokens(store, source: str) -> int:
    return int(sum(c["n_tokens"] for c in store.manifest["chunks"] if c["source"] == source))


def plan_blocks(store, source: str, layer: int, block_rows: int = BLOCK_ROWS, min_blocks: int = 1) -> list[np.ndarray]:
    """Live features of (source, layer), cut into blocks of about ``block_rows`` activations each, and into at least
    ``min_blocks`` blocks where the layer is big enough (a process pool balances its workers over them)."""
    if source == "neuron":
        from .neuron_examples import neuron_block_sizes

        features, sizes = neuron_block_sizes(store, layer)
        return cut_blocks(features, sizes, block_rows, min_blocks, max_features=None)
    counts = store.con.execute("""SELECT feature, sum(n_active) AS n FROM feature_stats
                                  WHERE source = ? AND layer = ? GROUP BY feature HAVING sum(n_active) > 0
                                  ORDER BY feature""", [source, layer]).fetchnumpy()
    return cut_blocks(counts["feature"].astype(np.int64), counts["n"].astype(np.int64), block_rows, min_blocks,
                      max_features=MAX_BLOCK_FEATURES)


MIN_SPLIT_ROWS = 50_000  # blocks cut for ``min_blocks`` stay at least this big: each costs a scan and a query


def cut_blocks(features: np.ndarray, sizes: np.ndarray, block_rows: int, min_blocks: int = 1,
               max_features: int | None = None) -> list[np.ndarray]:
    if min_blocks > 1:
        block_rows = min(block_rows, max(MIN_SPLIT_ROWS, -(-int(sizes.sum()) // min_blocks)))
    blocks, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if i > start and (total + size > block_rows or (max_features is not None and i - start >= max_features)):
            blocks.append(features[start:i])
            start, total = i, 0
        total += size
    if start < len(features):
        blocks.append(features[start:])
    return blocks


def fetch_block(store, source: str, layer: int, features: np.ndarray, seed: int) -> BlockRows | None:
    """One ordered scan for the block (on a private cursor, so the user's connection is untouched)."""
    features = np.asarray(features, dtype=np.int64)
    if len(features) == 0:
        return None
    if source == "neuron":  # true-activation windows, not the stored top rows
        from .neuron_examples import fetch_neuron_block

        return fetch_neuron_block(store, layer, features, seed)
    scan = views.activation_scan(store.manifest_obj, source, layer)
    con = store.con.cursor()
    try:
        rows = con.execute(f"""SELECT feature, seq_id, pos, act, {random_key_sql(seed)} AS key FROM {scan}
                               WHERE feature BETWEEN {int(features[0])} AND {int(features[-1])}""").fetchnumpy()
        logits = _logits(con, store, source, layer, features)
    finally:
        con.close()
    rows = _only(rows, features)
    feature_col = np.asarray(rows["feature"], dtype=np.int64)
    if len(feature_col) == 0:
        return None
    seq, pos = np.asarray(rows["seq_id"], dtype=np.int64), np.asarray(rows["pos"], dtype=np.int64)
    lowest = int(features[0])
    seen = np.bincount(feature_col - lowest, minlength=int(features[-1]) - lowest + 1) > 0
    present = np.flatnonzero(seen) + lowest
    rank = (np.cumsum(seen) - 1)[feature_col - lowest]  # a lookup table: cheaper than unique + searchsorted
    act = np.asarray(rows["act"], dtype=np.float32)
    finite = np.isfinite(act)
    if not finite.all():  # one reduction per block; JSON cannot carry NaN or Infinity
        raise UserError(f"the store holds non-finite activations (NaN or Infinity) of {source} layer {layer}, feature "
                        f"{int(feature_col[np.argmin(finite)])}: recollect it (collection now refuses them)")
    keys = row_key(rank, seq, pos)
    if len(keys) < 2 or bool((keys[1:] >= keys[:-1]).all()):  # one sorted file (a compacted layer): no sort
        order = np.arange(len(keys))
    else:  # files arrive as sorted runs, which a stable sort (timsort) merges in O(n log runs)
        order = np.argsort(keys, kind="stable")
    starts = np.zeros(len(present) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rank, minlength=len(present)), out=starts[1:])  # no key for rank len(present): it may not fit
    return BlockRows(source=source, layer=layer, features=present, starts=starts, seq=seq[order], pos=pos[order],
                     act=act[order], key=np.asarray(rows["key"], dtype=np.uint64)[order],
                     row_key=keys[order], logits=logits, total_tokens=source_total_tokens(store, source))


def _only(rows: dict, features: np.ndarray) -> dict:
    """Rows of the wanted features only. A planned block holds every live feature of its range, so this rarely
    drops anything; filtering here measured cheaper than an IN list in the scan."""
    lowest = int(features[0])
    wanted = np.zeros(int(features[-1]) - lowest + 1, dtype=bool)
    wanted[features - lowest] = True
    keep = wanted[np.asarray(rows["feature"], dtype=np.int64) - lowest]
    return rows if keep.all() else {name: np.asarray(column)[keep] for name, column in rows.items()}


def _logits(con, store, source: str, layer: int, features: np.ndarray) -> dict:
    files = files_of(store, "logit_lens", source, layer)
    if not files:
        return {}
    rows = con.execute(f"""SELECT feature, side = 'top' AS top, token_id FROM read_parquet({views.sql_list(files)})
                           WHERE feature BETWEEN {int(features[0])} AND {int(features[-1])}
                           ORDER BY feature, side, rank""").fetchnumpy()
    feature, top = np.asarray(rows["feature"], dtype=np.int64), np.asarray(rows["top"], dtype=bool)
    token_ids = np.asarray(rows["token_id"], dtype=np.int64)
    if len(feature) == 0:
        return {}
    cuts = np.flatnonzero((feature[1:] != feature[:-1]) | (top[1:] != top[:-1])) + 1
    firsts = np.concatenate([[0], cuts]).tolist()
    return {(f, "top" if t else "bottom"): ids for f, t, ids in
            zip(feature[firsts].tolist(), top[firsts].tolist(), np.split(token_ids, cuts))}
