"""Feature documents from a block of activations: example selection, windows, and the JSON bytes.

Selection per feature (rows are ordered by seq_id, pos, so stable sorts break ties the way the store API does):
top-k by activation descending; random samples by the seeded key; interval groups = the feature's activations cut
at nearest-rank quantiles into equally full buckets, a few seeded picks each. Windows, act_min/act_max and
histograms are computed for the whole block at once. The JSON is written directly from the arrays, byte-identical
to ``json.dumps(document, separators=(",", ":"), ensure_ascii=True)``, with each vocabulary entry encoded once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .feature_queries import BlockRows
from .token_index import TokenIndex

SIGNIFICANT_DIGITS = 6
_encode = json.encoder.encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses for str


@dataclass(frozen=True)
class DocumentOptions:
    """What each document holds. Defaults follow the original (20 top, 10 random, 50 before, 20 after)."""
    top_k: int = 20
    n_random: int = 10
    seed: int = 0
    before: int = 50
    after: int = 20
    n_intervals: int = 5
    per_interval: int = 3
    histogram_bins: int = 50
    n_quantiles: int = 100

    def __post_init__(self):
        for name in ("top_k", "per_interval", "histogram_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("n_random", "before", "after", "n_intervals", "n_quantiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")


class Vocabulary:
    """Token id -> JSON-encoded display text (and its length), computed once per process."""

    def __init__(self, texts: list[str]):
        self.encoded = np.empty(len(texts), dtype=object)
        self.encoded[:] = [_encode(text) for text in texts]
        self.lengths = np.fromiter(map(len, self.encoded), dtype=np.int64, count=len(texts))


def round_significant(values: np.ndarray, digits: int = SIGNIFICANT_DIGITS) -> np.ndarray:
    """Short decimals instead of float32 noise (6 significant digits, within float32 precision)."""
    x = np.asarray(values, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError("non-finite activation: JSON cannot carry NaN or Infinity")
    out = x.copy()
    nonzero = x != 0
    if nonzero.any():
        v = x[nonzero]
        exponent = np.floor(np.log10(np.abs(v))).astype(np.int64) - (digits - 1)
        scaled = np.empty_like(v)
        small = exponent < 0
        factor = 10.0 ** (-exponent[small])
        scaled[small] = np.round(v[small] * factor) / factor
        step = 10.0 ** exponent[~small]
        scaled[~small] = np.round(v[~small] / step) * step
        out[nonzero] = scaled
    return out


def _float_texts(values: np.ndarray, with_lengths: bool = False):
    """repr() of each rounded value, as json.dumps writes floats; zeros share one string."""
    rounded = round_significant(np.ravel(values))
    texts = np.empty(len(rounded), dtype=object)
    texts[:] = "0.0"
    nonzero = np.flatnonzero(rounded)
    reprs = [repr(v) for v in rounded[nonzero].tolist()]
    texts[nonzero] = reprs
    if not with_lengths:
        return texts
    lengths = np.full(len(rounded), 3, dtype=np.int64)
    lengths[nonzero] = np.fromiter(map(len, reprs), dtype=np.int64, count=len(reprs))
    return texts, lengths


def nearest_rank(sorted_values: np.ndarray, fractions_num: np.ndarray, denominator: int) -> np.ndarray:
    """Nearest-rank quantiles: the value at rank ceil(q * n) for q = num / denominator (integer arithmetic)."""
    n = len(sorted_values)
    return sorted_values[np.maximum((fractions_num * n + denominator - 1) // denominator - 1, 0)]


@dataclass
class _Selection:
    """Chosen examples of the block (grouped by feature, in document order) and per-feature summaries."""
    rank: np.ndarray  # example -> feature index in the block
    group: np.ndarray  # 0 top, 1 random, 2 + k interval k (highest interval first)
    row: np.ndarray  # example -> row of its activation in the block
    quantiles: np.ndarray  # (F, n_quantiles)
    interval_edges: np.ndarray  # (F, n_intervals + 1): min, inner nearest-rank bounds, max


def top_k(acts: np.ndarray, ordered: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest activations, descending; ties in row (seq_id, pos) order, as the store API."""
    if len(acts) > k:
        candidates = np.flatnonzero(acts >= ordered[len(acts) - k])  # the k largest, plus any ties of the k-th
        return candidates[np.argsort(-acts[candidates], kind="stable")[:k]]
    return np.argsort(-acts, kind="stable")


def select_examples(block: BlockRows, options: DocumentOptions) -> _Selection:
    n_features, n_groups = len(block.features), 2 + options.n_intervals
    quantiles = np.zeros((n_features, options.n_quantiles), dtype=np.float32)
    edges = np.zeros((n_features, options.n_intervals + 1), dtype=np.float32)
    q_num = np.arange(1, options.n_quantiles + 1)
    b_num = np.arange(1, options.n_intervals)
    rows, counts = [], np.zeros((n_features, n_groups), dtype=np.int64)
    for i in range(n_features):
        start, stop = int(block.starts[i]), int(block.starts[i + 1])
        acts = block.act[start:stop]
        ordered = np.sort(acts)
        quantiles[i] = nearest_rank(ordered, q_num, options.n_quantiles)
        bounds = nearest_rank(ordered, b_num, options.n_intervals)
        edges[i, 0], edges[i, 1:-1], edges[i, -1] = ordered[0], bounds, ordered[-1]
        picks = [top_k(acts, ordered, options.top_k)]
        sample_order = np.argsort(block.key[start:stop], kind="stable")
        picks.append(sample_order[:options.n_random])
        if options.n_intervals:
            bucket = np.searchsorted(bounds, acts[sample_order], side="left")
            picks.extend(sample_order[bucket == b][:options.per_interval] for b in range(options.n_intervals - 1, -1, -1))
        for g, chosen in enumerate(picks):
            counts[i, g] = len(chosen)
            rows.append(chosen + start)
    flat = counts.ravel()
    return _Selection(rank=np.repeat(np.repeat(np.arange(n_features), n_groups), flat),
                      group=np.repeat(np.tile(np.arange(n_groups), n_features), flat),
                      row=np.concatenate(rows), quantiles=quantiles, interval_edges=edges)


def _window_acts(block: BlockRows, selection: _Selection, lo: np.ndarray, hi: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """This feature's activation at every window token (0 where inactive), for all examples at once."""
    key = block.row_key
    base = (selection.rank.astype(np.int64) << 51) | (block.seq[selection.row] << 20)
    first = np.searchsorted(key, base | lo, side="left")
    last = np.searchsorted(key, base | hi, side="right")
    counts = last - first
    total = int(counts.sum())
    matched = np.repeat(first - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
    owner = np.repeat(np.arange(len(first)), counts)
    out = np.zeros(offsets[-1], dtype=np.float32)
    out[offsets[owner] + block.pos[matched] - lo[owner]] = block.act[matched]
    return out


def render_block(block: BlockRows, options: DocumentOptions, tokens: TokenIndex | Callable[[np.ndarray], TokenIndex],
                 vocab: Vocabulary) -> Iterator[tuple[int, bytes]]:
    """(feature, JSON bytes) for every feature of the block, in feature order. ``tokens`` may be a loader called
    with the sequences the chosen examples need (what a single feature uses instead of the whole index)."""
    selection = select_examples(block, options)
    seq, pos = block.seq[selection.row], block.pos[selection.row]
    if not isinstance(tokens, TokenIndex):
        tokens = tokens(seq)
    lo, hi = tokens.clip(seq, pos - options.before, pos + options.after)
    offsets, window_tokens = tokens.gather(seq, lo, hi)
    window_acts = _window_acts(block, selection, lo, hi, offsets)
    tokens_joined, token_cut = _joined(vocab.encoded[window_tokens], vocab.lengths[window_tokens])
    act_text, act_lengths = _float_texts(window_acts, with_lengths=True)
    acts_joined, act_cut = _joined(act_text, act_lengths)
    feature_first = np.searchsorted(selection.rank, np.arange(len(block.features) + 1))
    window_first = offsets[feature_first]
    act_min = np.minimum.reduceat(window_acts, window_first[:-1]).astype(np.float64)
    act_max = np.maximum.reduceat(window_acts, window_first[:-1]).astype(np.float64)
    histograms = _histograms(block, act_min, act_max, options.histogram_bins)
    bounds_text = _float_texts(np.concatenate([act_min, act_max]))
    quantile_text = _float_texts(selection.quantiles).reshape(selection.quantiles.shape)
    edges = round_significant(selection.interval_edges)
    examples = _example_texts(offsets, tokens_joined, token_cut, acts_joined, act_cut, seq, pos, lo, selection.rank)
    is_neuron = block.source == "neuron"
    for i, feature in enumerate(block.features.tolist()):
        sections = _sections(examples[feature_first[i]:feature_first[i + 1]],
                             selection.group[feature_first[i]:feature_first[i + 1]], edges[i], options)
        n_active = int(block.starts[i + 1] - block.starts[i])
        frequency = n_active / block.total_tokens if block.total_tokens else 0.0
        parts = [
            '{"top_logits":[', ",".join(vocab.encoded[block.logits.get((feature, "top"), [])].tolist()),
            '],"bottom_logits":[', ",".join(vocab.encoded[block.logits.get((feature, "bottom"), [])].tolist()),
            '],"act_min":', bounds_text[i], ',"act_max":', bounds_text[len(block.features) + i],
            ',"activation_frequency":', repr(float(frequency)),
            ',"layer":', str(block.layer), ',"feature":', str(feature),
            ',"examples_quantiles":[', ",".join(sections),
            '],"quantile_values":[', ",".join(quantile_text[i].tolist()),
            '],"histogram":[', ",".join(map(str, histograms[i].tolist())), "]",
            ',"is_neuron":true}' if is_neuron else "}",
        ]
        yield feature, "".join(parts).encode("ascii")


def _joined(texts: np.ndarray, lengths: np.ndarray) -> tuple[str, np.ndarray]:
    """All texts joined by commas in one C-level call, and where each one starts (so slices are sub-lists)."""
    cut = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=cut[1:])
    return ",".join(texts.tolist()), cut


_EXAMPLE = '{"tokens":[%s],"tokens_acts_list":[%s],"train_token_ind":%d,"is_repeated_datapoint":%s}'


def _example_texts(offsets, tokens_joined, token_cut, acts_joined, act_cut, seq, pos, lo, rank) -> list[str]:
    """Each example's JSON; repeated = its window overlaps an earlier window of the same feature and sequence."""
    texts, seen, current = [], {}, -1
    token_at, act_at = token_cut[offsets].tolist(), act_cut[offsets].tolist()
    lengths = np.diff(offsets).tolist()
    for e, (owner, s, p, first) in enumerate(zip(rank.tolist(), seq.tolist(), pos.tolist(), lo.tolist())):
        if owner != current:
            current, seen = owner, {}
        last = first + lengths[e] - 1
        windows = seen.setdefault(s, [])
        repeated = any(a <= last and first <= b for a, b in windows)
        windows.append((first, last))
        texts.append(_EXAMPLE % (tokens_joined[token_at[e]:token_at[e + 1] - 1], acts_joined[act_at[e]:act_at[e + 1] - 1],
                                 p - first, "true" if repeated else "false"))
    return texts


def _sections(examples: list[str], groups: np.ndarray, edges: np.ndarray, options: DocumentOptions) -> list[str]:
    """The examples_quantiles entries: top, random, then the non-empty intervals (highest first)."""
    grouped: dict[int, list[str]] = {}
    for text, group in zip(examples, groups.tolist()):
        grouped.setdefault(group, []).append(text)
    names = ["Top activations"] + (["Random samples"] if options.n_random else [])
    sections = [_section(name, grouped.get(g, [])) for g, name in enumerate(names)]
    for k in range(options.n_intervals):
        bucket = options.n_intervals - 1 - k
        if grouped.get(2 + k):
            low, high = edges[bucket], edges[bucket + 1]
            name = (f"Interval {100 * bucket // options.n_intervals}-{100 * (bucket + 1) // options.n_intervals}% "
                    f"({low:.4g} to {high:.4g})")
            sections.append(_section(name, grouped[2 + k]))
    return sections


def _section(name: str, examples: list[str]) -> str:
    return '{"quantile_name":' + _encode(name) + ',"examples":[' + ",".join(examples) + "]}"


def _histograms(block: BlockRows, act_min: np.ndarray, act_max: np.ndarray, bins: int) -> np.ndarray:
    """Counts of every activation in ``bins`` equal bins over [act_min, act_max], as the viewer bins them."""
    rank = np.repeat(np.arange(len(block.features)), np.diff(block.starts))
    low, high = act_min[rank], act_max[rank]
    width = np.where(high > low, high - low, 1.0)
    index = np.clip(np.floor((block.act - low) / width * bins), 0, bins - 1).astype(np.int64)
    index[high <= low] = 0
    return np.bincount(rank * bins + index, minlength=len(block.features) * bins).reshape(-1, bins)
