"""Which examples each feature's document shows, chosen for a whole block of features at once.

Rows are ordered by (feature, seq_id, pos), so stable sorts break ties the way the store API does. Top-k: by
activation descending, at most ``max_per_sequence`` per sequence. Random samples: the first ``n_random`` rows in the
seeded key order. Interval groups: the feature's activations cut into equal activation ranges of (0, max]
(``interval_kind="range"``) or at nearest-rank quantiles into equally full buckets (``"count"``), the first
``per_interval`` rows of each bucket in the seeded key order, highest bucket first. Per feature only a sort of its activations, a top-k and
a partial selection of the seeded order run; everything else is done for the block in a few array operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .feature_queries import BlockRows


@dataclass
class Selection:
    """Chosen examples of the block (grouped by feature, in document order) and per-feature summaries."""
    rank: np.ndarray  # example -> feature index in the block
    group: np.ndarray  # 0 top, 1 random, 2 + k interval k (highest interval first)
    row: np.ndarray  # example -> row of its activation in the block
    counts: np.ndarray  # (F, 2 + n_intervals) examples per feature and group
    quantiles: np.ndarray  # (F, n_quantiles)
    interval_edges: np.ndarray  # (F, n_intervals + 1): min, inner nearest-rank bounds, max


def nearest_rank_rows(starts: np.ndarray, denominator: int, count: int) -> np.ndarray:
    """(F, count) rows of the nearest-rank quantiles q = 1..count / denominator of each feature's sorted rows:
    rank ceil(q * n), in integer arithmetic."""
    sizes = np.diff(starts)[:, None]
    numerators = np.arange(1, count + 1)[None, :]
    return starts[:-1, None] + np.maximum((numerators * sizes + denominator - 1) // denominator - 1, 0)


def top_k(acts: np.ndarray, ordered: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest activations, descending; ties in row (seq_id, pos) order, as the store API."""
    if len(acts) > k:
        candidates = np.flatnonzero(acts >= ordered[len(acts) - k])  # the k largest, plus any ties of the k-th
        return candidates[np.argsort(-acts[candidates], kind="stable")[:k]]
    return np.argsort(-acts, kind="stable")


def capped_top_k(acts: np.ndarray, seqs: np.ndarray, ordered: np.ndarray, k: int, cap: int | None) -> np.ndarray:
    """``top_k`` keeping at most ``cap`` rows per sequence (each sequence's highest, ties by pos), as
    ``Feature.top_examples(max_per_sequence=cap)``. The plain top-k is tried first: usually it already fits."""
    chosen = top_k(acts, ordered, k)
    if cap is None or len(chosen) <= cap:
        return chosen
    chosen_seqs = np.sort(seqs[chosen])
    if not (chosen_seqs[cap:] == chosen_seqs[:-cap]).any():  # no sequence appears more than cap times
        return chosen
    order = np.argsort(-acts, kind="stable")  # activation descending, ties by row = (seq_id, pos)
    by_seq = np.argsort(seqs[order], kind="stable")
    sorted_seqs = seqs[order][by_seq]
    occurrence = np.empty(len(order), dtype=np.int64)
    occurrence[by_seq] = np.arange(len(order)) - np.searchsorted(sorted_seqs, sorted_seqs, side="left")
    return order[occurrence < cap][:k]


def seeded_prefix(keys: np.ndarray, wanted: int) -> np.ndarray:
    """At least ``wanted`` first indices of the stable seeded order (by key, ties by row), without sorting all."""
    if len(keys) <= wanted or wanted == 0:
        return np.argsort(keys, kind="stable")
    kth = np.partition(keys, wanted - 1)[wanted - 1]
    candidates = np.flatnonzero(keys <= kth)  # every key below the kth and all of its ties: an exact prefix
    return candidates[np.argsort(keys[candidates], kind="stable")]


def _positions(lengths: np.ndarray) -> np.ndarray:
    """0, 1, .. within each run of the given lengths."""
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _concat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, parts), dtype=np.int64, count=len(parts))
    return np.concatenate(parts), np.repeat(np.arange(len(parts)), lengths), _positions(lengths)


def _fill_short_buckets(block: BlockRows, inner: np.ndarray, prefixes: list[np.ndarray], rows: np.ndarray,
                        rank: np.ndarray, bucket: np.ndarray, position: np.ndarray, per_interval: int):
    """Interval candidates: the seeded prefix, except for buckets the prefix holds fewer than ``per_interval`` rows
    of while the feature holds more (ties, an unlucky key order, or a sparse activation range, the common case of
    the top range): those buckets take all their rows, ordered by (key, row) as the seeded order is. Array
    operations over the block, so sparse ranges cost no per-feature sort."""
    n_features, n_intervals = len(block.features), inner.shape[1] + 1
    found = np.bincount(rank * n_intervals + bucket, minlength=n_features * n_intervals).reshape(-1, n_intervals)
    whole = np.fromiter(map(len, prefixes), dtype=np.int64, count=n_features) == np.diff(block.starts)
    maybe = ~whole[:, None] & (found < per_interval)
    if not maybe.any():
        return rows, rank, bucket, position
    every_rank = np.repeat(np.arange(n_features), np.diff(block.starts))
    every_bucket = (inner[every_rank] < block.act[:, None]).sum(axis=1)
    held = np.bincount(every_rank * n_intervals + every_bucket, minlength=n_features * n_intervals).reshape(found.shape)
    short = (maybe & (found < np.minimum(per_interval, held))).ravel()
    if not short.any():
        return rows, rank, bucket, position
    extra = np.flatnonzero(short[every_rank * n_intervals + every_bucket])
    extra = extra[np.lexsort((extra, block.key[extra]))]  # seeded order: by key, ties by row
    keep = ~short[rank * n_intervals + bucket]
    return (np.concatenate([rows[keep], extra]), np.concatenate([rank[keep], every_rank[extra]]),
            np.concatenate([bucket[keep], every_bucket[extra]]),
            np.concatenate([position[keep], np.arange(len(extra))]))  # within a group, one source only


def select_examples(block: BlockRows, options) -> Selection:
    n_features, n_intervals = len(block.features), options.n_intervals
    n_groups = 2 + n_intervals
    bounds = block.starts.tolist()
    ordered = block.act.copy()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ordered[start:stop].sort()
    quantiles = ordered[nearest_rank_rows(block.starts, options.n_quantiles, options.n_quantiles)]
    edges = np.zeros((n_features, n_intervals + 1), dtype=np.float32)
    edges[:, -1] = ordered[block.starts[1:] - 1]
    if getattr(options, "interval_kind", "count") == "range":  # equal parts of (0, max]
        inner = (edges[:, -1:] * (np.arange(1, n_intervals, dtype=np.float32) / np.float32(n_intervals))[None, :])
    else:  # nearest-rank quantiles: equally full buckets
        inner = ordered[nearest_rank_rows(block.starts, n_intervals, max(n_intervals - 1, 0))]
        edges[:, 0] = ordered[block.starts[:-1]]
    edges[:, 1:-1] = inner

    wanted = max(options.n_random, 4 * options.per_interval * n_intervals)
    tops, prefixes = [], []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        tops.append(capped_top_k(block.act[start:stop], block.seq[start:stop], ordered[start:stop], options.top_k,
                                 getattr(options, "max_per_sequence", None)) + start)
        prefixes.append(seeded_prefix(block.key[start:stop], wanted) + start)
    rows, rank, position = _concat(prefixes)
    top_rows, top_rank, top_position = _concat(tops)
    random = position < options.n_random
    i_rows, i_rank, i_position = rows, rank, position  # the rows the interval groups choose from
    i_bucket = (inner[rank] < block.act[rows][:, None]).sum(axis=1)  # = searchsorted(bounds, act, "left")
    if n_intervals:
        i_rows, i_rank, i_bucket, i_position = _fill_short_buckets(block, inner, prefixes, rows, rank, i_bucket,
                                                                   position, options.per_interval)
    group = 2 + (n_intervals - 1 - i_bucket)
    by_group = np.lexsort((i_position, group, i_rank))
    run_key = i_rank[by_group] * n_groups + group[by_group]
    run_start = np.ones(len(run_key), dtype=bool)
    run_start[1:] = run_key[1:] != run_key[:-1]
    first = np.maximum.accumulate(np.where(run_start, np.arange(len(run_key)), 0))
    interval = by_group[np.arange(len(run_key)) - first < options.per_interval] if n_intervals else by_group[:0]

    all_rows = np.concatenate([top_rows, rows[random], i_rows[interval]])
    all_rank = np.concatenate([top_rank, rank[random], i_rank[interval]])
    all_group = np.concatenate([np.zeros(len(top_rows), dtype=np.int64), np.ones(int(random.sum()), dtype=np.int64),
                                group[interval]])
    all_position = np.concatenate([top_position, position[random], i_position[interval]])
    order = np.lexsort((all_position, all_group, all_rank))
    counts = np.bincount(all_rank * n_groups + all_group, minlength=n_features * n_groups).reshape(-1, n_groups)
    return Selection(rank=all_rank[order], group=all_group[order], row=all_rows[order], counts=counts,
                     quantiles=quantiles, interval_edges=edges)
