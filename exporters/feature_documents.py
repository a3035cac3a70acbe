"""Feature documents from a block of activations: windows, per-feature summaries and the JSON bytes.

Examples are chosen in ``example_selection``; windows, act_min/act_max, histograms and the text of every example
(``document_text``) are computed for the whole block at once, and each document is one join of ready-made pieces,
byte-identical to ``json.dumps(document, separators=(",", ":"), ensure_ascii=True)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from .example_selection import Selection
from .neuron_examples import activation_counts, check_window_size, sample_block, sample_sizes, select
from .document_text import activation_lists, float_texts, repeated_windows, round_significant, window_token_texts
from .feature_queries import BlockRows, row_key
from .token_index import TokenIndex

_encode = json.encoder.encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses for str
INTERVAL_KINDS = ("range", "count")


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
    # At most this many top activations from one sequence (None: no cap, the original's choice). 2 keeps one long
    # trace from filling the list (12 of 20 before) while still showing that a feature repeats within a trace.
    max_per_sequence: int | None = 2
    # Interval groups: "range" cuts (0, max] into equal activation ranges, the bins of the viewer's histogram and
    # colour scale, so a weak mode gets its own group; "count" (the original) cuts into equally full buckets.
    interval_kind: str = "range"

    def __post_init__(self):
        for name in ("top_k", "per_interval", "histogram_bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("n_random", "before", "after", "n_intervals", "n_quantiles"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.max_per_sequence is not None and self.max_per_sequence < 1:
            raise ValueError("max_per_sequence must be at least 1 (or None for no cap)")
        if self.interval_kind not in INTERVAL_KINDS:
            raise ValueError(f"interval_kind must be one of {', '.join(INTERVAL_KINDS)}")


class Vocabulary:
    """Token id -> JSON-encoded display text (and its length), computed once per process."""

    def __init__(self, texts: list[str]):
        self.encoded = np.empty(len(texts), dtype=object)
        self.encoded[:] = [_encode(text) for text in texts]
        self.lengths = np.fromiter(map(len, self.encoded), dtype=np.int64, count=len(texts))


def _window_activity(block: BlockRows, selection: Selection, lo: np.ndarray, hi: np.ndarray,
                     offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where this feature's stored activations fall in the flat window positions (ascending), and their values."""
    key, rank, seq = block.row_key, selection.rank, block.seq[selection.row]
    first = np.searchsorted(key, row_key(rank, seq, lo), side="left")
    last = np.searchsorted(key, row_key(rank, seq, hi), side="right")
    counts = last - first
    total = int(counts.sum())
    matched = np.repeat(first - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(total)
    owner = np.repeat(np.arange(len(first)), counts)
    at, values = offsets[owner] + block.pos[matched] - lo[owner], block.act[matched]
    last = np.ones(len(at), dtype=bool)  # a damaged store may hold a row twice: one value per token, the last
    last[:-1] = at[1:] != at[:-1]
    return (at, values) if last.all() else (at[last], values[last])


def render_block(block: BlockRows, options: DocumentOptions, tokens: TokenIndex | Callable[[np.ndarray], TokenIndex],
                 vocab: Vocabulary) -> Iterator[tuple[int, bytes]]:
    """(feature, JSON bytes) for every feature of the block, in feature order. ``tokens`` may be a loader called
    with the sequences the chosen examples need (what a single feature uses instead of the whole index)."""
    check_window_size(block, options)
    selection = select(block, options)  # neurons: top candidates and the uniform sample (neuron_examples)
    seq, pos = block.seq[selection.row], block.pos[selection.row]
    if not isinstance(tokens, TokenIndex):
        tokens = tokens(seq)
    lo, hi = tokens.clip(seq, pos - options.before, pos + options.after)
    offsets = np.zeros(len(seq) + 1, dtype=np.int64)
    np.cumsum(hi - lo + 1, out=offsets[1:])
    active_at, active_values = _window_activity(block, selection, lo, hi, offsets)
    feature_first = np.searchsorted(selection.rank, np.arange(len(block.features) + 1))
    window_acts = np.zeros(offsets[-1], dtype=np.float32)
    window_acts[active_at] = active_values
    act_min = np.minimum.reduceat(window_acts, offsets[feature_first[:-1]]).astype(np.float64)
    act_max = np.maximum.reduceat(window_acts, offsets[feature_first[:-1]]).astype(np.float64)
    histograms = _histograms(sample_block(block), act_min, act_max, options.histogram_bins)
    n_features = len(block.features)
    texts, text_lengths = float_texts(np.concatenate([act_min, act_max, selection.quantiles.ravel(), active_values]),
                                      with_lengths=True)  # one call, so a value shared by these is formatted once
    bounds_text = texts[:2 * n_features]
    quantile_text = texts[2 * n_features:2 * n_features + selection.quantiles.size].reshape(selection.quantiles.shape)
    active_from = 2 * n_features + selection.quantiles.size
    edges = round_significant(selection.interval_edges)
    flat_first = tokens.seq_start[seq] + lo
    token_text, token_start, token_stop = window_token_texts(tokens.token_ids, flat_first, flat_first + hi - lo,
                                                             vocab.encoded, vocab.lengths)
    act_text, act_start, act_stop = activation_lists(offsets, active_at, texts[active_from:], text_lengths[active_from:])
    repeated = repeated_windows(feature_first, seq, lo, hi)
    example_pieces = _example_pieces(token_text, token_start, token_stop, act_text, act_start, act_stop,
                                     (pos - lo).tolist(), repeated)
    headers, trailers = [], []
    is_neuron = block.source == "neuron"
    n_actives = activation_counts(block)  # exact counts, for neurons too
    sampled = sample_sizes(block)
    for i, feature in enumerate(block.features.tolist()):
        n_active = int(n_actives[i])
        frequency = n_active / block.total_tokens if block.total_tokens else 0.0
        headers.append("".join([
            '{"top_logits":[', ",".join(vocab.encoded[block.logits.get((feature, "top"), [])].tolist()),
            '],"bottom_logits":[', ",".join(vocab.encoded[block.logits.get((feature, "bottom"), [])].tolist()),
            '],"act_min":', bounds_text[i], ',"act_max":', bounds_text[n_features + i],
            ',"activation_frequency":', repr(float(frequency)),
            ',"layer":', str(block.layer), ',"feature":', str(feature), ',"examples_quantiles":[']))
        trailers.append("".join([
            '],"quantile_values":[', ",".join(quantile_text[i].tolist()),
            '],"histogram":[', ",".join(map(str, histograms[i].tolist())), "]",
            f',"distribution_sample_size":{sampled[i]},"is_neuron":true}}' if is_neuron else "}"]))
    _frame_sections(example_pieces, selection, feature_first, headers, trailers, edges, options)
    pieces = example_pieces.ravel().tolist()
    for i, feature in enumerate(block.features.tolist()):
        yield feature, "".join(pieces[_PIECES * feature_first[i]:_PIECES * feature_first[i + 1]]).encode("ascii")


_PIECES = 7  # per example: opening, tokens, between, acts, train_token_ind and is_repeated_datapoint, closing


def _example_pieces(token_text: str, token_start, token_stop, act_text: str, act_start, act_stop, train_index: list[int],
                    repeated: np.ndarray) -> np.ndarray:
    """(examples, 7) strings that concatenate to the examples' JSON; openings and closings are framed later."""
    pieces = np.empty((len(train_index), _PIECES), dtype=object)
    pieces[:, 0] = ',{"tokens":['
    pieces[:, 1] = [token_text[a:b] for a, b in zip(token_start.tolist(), token_stop.tolist())]
    pieces[:, 2] = '],"tokens_acts_list":['
    pieces[:, 3] = [act_text[a:b] for a, b in zip(act_start.tolist(), act_stop.tolist())]
    tail = np.empty((max(train_index, default=0) + 1, 2), dtype=object)
    tail[:, 0] = [f'],"train_token_ind":{i},"is_repeated_datapoint":false' for i in range(len(tail))]
    tail[:, 1] = [f'],"train_token_ind":{i},"is_repeated_datapoint":true' for i in range(len(tail))]
    pieces[:, 4] = tail[train_index, repeated.astype(np.int64)]
    pieces[:, 5] = "}"
    pieces[:, 6] = ""
    return pieces


def _frame_sections(pieces: np.ndarray, selection: Selection, feature_first: np.ndarray, headers: list[str],
                    trailers: list[str], edges: np.ndarray, options: DocumentOptions) -> None:
    """Put each examples_quantiles section's opening before its first example and its closing after its last
    (top, random, then the non-empty intervals, highest first), and each feature's header and trailer around."""
    n_examples = len(selection.group)
    if n_examples == 0:
        return
    rank, group = selection.rank, selection.group
    opens = np.ones(n_examples, dtype=bool)
    opens[1:] = (rank[1:] != rank[:-1]) | (group[1:] != group[:-1])
    section_first = np.flatnonzero(opens)
    section_last = np.append(section_first[1:], n_examples) - 1
    pieces[section_last, 5] = "}]}"
    first_of_feature = set(feature_first[:-1].tolist())
    for first, i, g in zip(section_first.tolist(), rank[section_first].tolist(), group[section_first].tolist()):
        opening = '{"quantile_name":' + _encode(_section_name(g, edges[i], options)) + ',"examples":[{"tokens":['
        pieces[first, 0] = headers[i] + opening if first in first_of_feature else "," + opening
    pieces[feature_first[1:] - 1, 6] = trailers


def _section_name(group: int, edges: np.ndarray, options: DocumentOptions) -> str:
    """The group's header in the viewer, which says what kind of group it is."""
    if group < 2:
        return "Top activations" if group == 0 else "Random samples"
    bucket = options.n_intervals - 1 - (group - 2)
    low, high = edges[bucket], edges[bucket + 1]
    a, b = 100 * bucket // options.n_intervals, 100 * (bucket + 1) // options.n_intervals
    if options.interval_kind == "range":
        return f"Activation range {a}-{b}% of max ({low:.4g} to {high:.4g})"
    return f"Interval {a}-{b}% ({low:.4g} to {high:.4g})"


def _histograms(block: BlockRows, act_min: np.ndarray, act_max: np.ndarray, bins: int) -> np.ndarray:
    """Counts of every activation in ``bins`` equal bins over [act_min, act_max], as the viewer bins them."""
    rank = np.repeat(np.arange(len(block.features)), np.diff(block.starts))
    low, high = act_min[rank], act_max[rank]
    width = np.where(high > low, high - low, 1.0)
    index = np.clip(np.floor((block.act - low) / width * bins), 0, bins - 1).astype(np.int64)
    index[high <= low] = 0
    return np.bincount(rank * bins + index, minlength=len(block.features) * bins).reshape(-1, bins)
