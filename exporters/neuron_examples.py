"""Neuron documents from the stored true-activation windows (``featurestore.neuron_windows``).

A neuron block's rows are the neuron's real values at every token of its stored windows (negative ones included),
so the windows ``render_block`` builds carry the true activations. Examples are chosen from two subsets:
"Top activations" from the chunks' top candidates (the store-wide top k is always among them; the original's
act > 0.01 rule applies), and "Random samples", the interval groups, ``quantile_values`` and the histogram from the
uniform sample of the neuron's positive activations (the ``sample`` smallest sample keys over all chunks).
``activation_frequency`` is the exact one of the ``features`` view.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from featurestore import schema, views
from featurestore.errors import UserError
from featurestore.neuron_windows import WINDOW_AFTER, WINDOW_BEFORE

from .example_selection import Selection, select_examples

NEURON_MIN_ACT = 0.01  # the original's threshold for a neuron's top examples (featurestore.capture.NEURON_MIN_ACT)


@dataclass
class NeuronCandidates:
    top: np.ndarray  # block rows of the top candidates, ascending
    sample: np.ndarray  # block rows of the store-wide uniform sample, ascending
    counts: np.ndarray  # (F,) exact activation counts (act > 0 over all tokens)


def window_files(store, layer: int | None = None) -> list[str]:
    prefix = schema.partition_dir("neuron_windows", "neuron", layer) + "/" if layer is not None else ""
    return [str(store.path / f) for f in store.manifest_obj.files("neuron_windows", "neuron") if f.startswith(prefix)]


def window_settings(store) -> dict:
    settings = store.manifest.get("sources", {}).get("neuron", {}).get("windows")
    if settings is None:
        raise UserError(f"{store.path} holds neurons collected before example windows were stored; "
                        "collect them again into a new store")
    return settings


def neuron_block_sizes(store, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """(neurons, stored window values of each) of a layer: what its blocks are cut by."""
    files = window_files(store, layer)
    if not files:
        window_settings(store)  # a store collected before windows were stored: a one-line error, not 0 documents
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    counts = store.con.cursor().execute(f"""SELECT feature, sum(len(acts)) AS n FROM read_parquet({views.sql_list(files)})
                                            GROUP BY feature ORDER BY feature""").fetchnumpy()
    return counts["feature"].astype(np.int64), counts["n"].astype(np.int64)


def fetch_neuron_rows(store, layer: int, features: np.ndarray, seed: int) -> tuple[dict, dict]:
    """(window values, candidates) of the block's neurons: dense (feature, seq_id, pos, act, key) and the
    candidates' (feature, seq_id, pos, top, sample) with the sample already cut to the store-wide smallest keys."""
    files = window_files(store, layer)
    lo, hi = int(features[0]), int(features[-1])
    n_sample = int(window_settings(store)["sample"])
    scan = f"(SELECT * FROM read_parquet({views.sql_list(files)}) WHERE feature BETWEEN {lo} AND {hi})"
    con = store.con.cursor()
    try:
        values = con.execute(f"""SELECT DISTINCT feature, seq_id, start + i - 1 AS pos, acts[i] AS act,
                                        hash(seq_id, start + i - 1, feature, {int(seed)}::BIGINT) AS key
                                 FROM (SELECT feature, seq_id, start, acts, generate_subscripts(acts, 1) AS i FROM {scan})
                              """).fetchnumpy()
        candidates = con.execute(f"""SELECT feature, seq_id, pos, top,
                                            sample_key IS NOT NULL AND row_number() OVER (
                                                PARTITION BY feature ORDER BY sample_key NULLS LAST, seq_id, pos)
                                                <= {n_sample} AS sample
                                     FROM {scan}""").fetchnumpy()
        counts = dict(con.execute("""SELECT feature, activation_count FROM features
                                     WHERE source = 'neuron' AND layer = ? AND feature BETWEEN ? AND ?""",
                                  [layer, lo, hi]).fetchall())
    finally:
        con.close()
    return values, {"candidates": candidates, "counts": counts}


def attach_candidates(block, extra: dict):
    """The block with its ``NeuronCandidates`` (rows found through the block's sorted row key)."""
    c = extra["candidates"]
    feature = np.asarray(c["feature"], dtype=np.int64)
    rank = np.searchsorted(block.features, feature)
    key = (rank << 51) | (np.asarray(c["seq_id"], dtype=np.int64) << 20) | np.asarray(c["pos"], dtype=np.int64)
    rows = np.searchsorted(block.row_key, key)
    top, sample = np.asarray(c["top"], dtype=bool), np.asarray(c["sample"], dtype=bool)
    counts = np.array([extra["counts"].get(int(f), 0) for f in block.features], dtype=np.int64)
    return replace(block, neuron=NeuronCandidates(top=np.unique(rows[top]), sample=np.unique(rows[sample]), counts=counts))


def subset(block, rows: np.ndarray):
    """The block restricted to ``rows`` (ascending), with the same features."""
    row_key = block.row_key[rows]
    starts = np.searchsorted(row_key, np.arange(len(block.features) + 1, dtype=np.int64) << 51)
    return replace(block, starts=starts, seq=block.seq[rows], pos=block.pos[rows], act=block.act[rows],
                   key=block.key[rows], row_key=row_key, neuron=None)


def sample_block(block):
    """What a neuron's distribution summaries are computed from: its uniform sample (the block itself otherwise)."""
    return block if getattr(block, "neuron", None) is None else subset(block, block.neuron.sample)


def select(block, options) -> Selection:
    """``select_examples`` for a block; for neurons, top from the top candidates and the rest from the sample."""
    if getattr(block, "neuron", None) is None:
        return select_examples(block, options)
    cands = block.neuron
    top_sel = select_examples(subset(block, cands.top), options)
    sample_sel = select_examples(subset(block, cands.sample), options)
    top_rows = cands.top[top_sel.row]
    keep_top = (top_sel.group == 0) & (block.act[top_rows] > NEURON_MIN_ACT)
    keep_rest = sample_sel.group >= 1
    rank = np.concatenate([top_sel.rank[keep_top], sample_sel.rank[keep_rest]])
    group = np.concatenate([top_sel.group[keep_top], sample_sel.group[keep_rest]])
    row = np.concatenate([top_rows[keep_top], cands.sample[sample_sel.row[keep_rest]]])
    order = np.lexsort((np.arange(len(rank)), group, rank))
    counts = sample_sel.counts.copy()
    counts[:, 0] = np.bincount(top_sel.rank[keep_top], minlength=len(block.features))
    return Selection(rank=rank[order], group=group[order], row=row[order], counts=counts,
                     quantiles=sample_sel.quantiles, interval_edges=sample_sel.interval_edges)


def sample_sizes(block) -> list[int] | None:
    """Neurons: per feature, the size of the uniform sample its random samples, intervals, quantile_values and
    histogram were computed from (the document says so as ``distribution_sample_size``)."""
    if getattr(block, "neuron", None) is None:
        return None
    rank = np.searchsorted(block.starts, block.neuron.sample, side="right") - 1
    return np.bincount(rank, minlength=len(block.features)).tolist()


def activation_counts(block) -> np.ndarray:
    """Per feature of the block: its exact activation count (neurons) or its stored rows (transcoder: the same)."""
    if getattr(block, "neuron", None) is not None:
        return block.neuron.counts
    return np.diff(block.starts)


def check_window_size(block, options) -> None:
    """Neuron windows exist only as wide as collection stored them (``block`` may be a source name)."""
    is_neuron = block == "neuron" if isinstance(block, str) else getattr(block, "neuron", None) is not None
    if is_neuron and (options.before > WINDOW_BEFORE or options.after > WINDOW_AFTER):
        raise UserError(f"neuron windows are stored with {WINDOW_BEFORE} tokens before and {WINDOW_AFTER} after; "
                        "use --before/--after within those")


def fetch_neuron_block(store, layer: int, features: np.ndarray, seed: int):
    """The neurons' ``BlockRows``: window values ordered by (feature, seq_id, pos), with their candidates."""
    from .feature_queries import BlockRows, _logits, source_total_tokens

    if not window_files(store, layer):
        window_settings(store)  # an old store: say so
        return None
    values, extra = fetch_neuron_rows(store, layer, features, seed)
    feature_col = np.asarray(values["feature"], dtype=np.int64)
    if len(feature_col) == 0:
        return None
    seq, pos = np.asarray(values["seq_id"], dtype=np.int64), np.asarray(values["pos"], dtype=np.int64)
    present = np.unique(feature_col)
    rank = np.searchsorted(present, feature_col)
    row_key = (rank << 51) | (seq << 20) | pos
    order = np.argsort(row_key, kind="stable")
    row_key = row_key[order]
    starts = np.searchsorted(row_key, np.arange(len(present) + 1, dtype=np.int64) << 51)
    con = store.con.cursor()
    try:
        logits = _logits(con, store, "neuron", layer, present)
    finally:
        con.close()
    block = BlockRows(source="neuron", layer=layer, features=present, starts=starts, seq=seq[order], pos=pos[order],
                      act=np.asarray(values["act"], dtype=np.float32)[order],
                      key=np.asarray(values["key"], dtype=np.uint64)[order], row_key=row_key, logits=logits,
                      total_tokens=source_total_tokens(store, "neuron"))
    return attach_candidates(block, extra)
