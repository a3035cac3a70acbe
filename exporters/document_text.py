"""The JSON text of example windows, built per block with a handful of large joins instead of per-token Python work.

Three observations keep this cheap: a window's ``tokens`` list is a slice of the block's joined token text (windows
are contiguous runs of the flat token index, so each token is encoded and joined once per block, not once per
example); a window's ``tokens_acts_list`` is mostly zeros, so it is written as runs of ``0.0,`` between the few
active values; and each distinct activation value is formatted once (``repr`` of the rounded float, which is what
``json.dumps`` writes). The text is byte-identical to ``json.dumps(..., separators=(",", ":"), ensure_ascii=True)``.
"""
from __future__ import annotations

import numpy as np

SIGNIFICANT_DIGITS = 6
_PAIR_BUDGET = 4_000_000  # example pairs compared at once by repeated_windows (bounds its memory)


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


def float_texts(values: np.ndarray, with_lengths: bool = False):
    """repr() of each rounded value, as json.dumps writes floats; each distinct value is formatted once."""
    distinct, inverse = np.unique(round_significant(np.ravel(values)), return_inverse=True)
    texts = np.empty(len(distinct), dtype=object)
    texts[:] = list(map(repr, distinct.tolist()))
    texts[distinct == 0] = "0.0"  # unique merged -0.0 into 0.0, but either may have been kept
    if not with_lengths:
        return texts[inverse]
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    return texts[inverse], lengths[inverse]


def window_token_texts(token_ids: np.ndarray, first: np.ndarray, last: np.ndarray, encoded: np.ndarray,
                       encoded_lengths: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """The comma-joined token texts of windows ``[first, last]`` of the flat token index, as one string and the
    (start, stop) of each window in it. Only the union of the windows is encoded, once."""
    order = np.argsort(first, kind="stable")
    run_stop = np.maximum.accumulate(last[order] + 1)
    opens = np.ones(len(order), dtype=bool)
    opens[1:] = first[order][1:] > run_stop[:-1]
    run_first = first[order][opens]
    run_end = run_stop[np.append(opens[1:], True)]
    run_length = run_end - run_first
    run_offset = np.zeros(len(run_first) + 1, dtype=np.int64)
    np.cumsum(run_length, out=run_offset[1:])
    flat = np.repeat(run_first - run_offset[:-1], run_length) + np.arange(run_offset[-1])
    ids = np.asarray(token_ids[flat])
    cut = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(encoded_lengths[ids] + 1, out=cut[1:])
    run = np.searchsorted(run_first, first, side="right") - 1
    start = run_offset[run] + first - run_first[run]
    return ",".join(encoded[ids].tolist()), cut[start], cut[start + last - first + 1] - 1


def activation_lists(offsets: np.ndarray, active_at: np.ndarray, texts: np.ndarray,
                     text_lengths: np.ndarray) -> tuple[str, np.ndarray, np.ndarray]:
    """Every window's ``tokens_acts_list`` items as one string and the (start, stop) of each window in it.

    ``offsets`` cut the flat window positions into windows; ``active_at`` (ascending) are the flat positions of
    stored activations and ``texts`` their values' JSON (``text_lengths`` long); every other position is 0.0."""
    n_windows, n_active = len(offsets) - 1, len(active_at)
    window = np.searchsorted(offsets, active_at, side="right") - 1
    previous_end = np.empty(n_active, dtype=np.int64)
    previous_end[:1] = offsets[window[:1]]
    if n_active > 1:
        same = window[1:] == window[:-1]
        previous_end[1:] = np.where(same, active_at[:-1] + 1, offsets[window[1:]])
    per_window = np.bincount(window, minlength=n_windows)
    window_end = offsets[:-1].copy()
    has_active = per_window > 0
    active_end = np.cumsum(per_window) - 1
    window_end[has_active] = active_at[active_end[has_active]] + 1
    gap, tail = active_at - previous_end, offsets[1:] - window_end
    zero_runs = np.empty(int(max(gap.max(initial=0), tail.max(initial=0))) + 1, dtype=object)
    zero_runs[:] = ["0.0," * n for n in range(len(zero_runs))]
    pieces = np.empty(2 * n_active + n_windows, dtype=object)
    lengths = np.empty(len(pieces), dtype=np.int64)
    gap_at = 2 * np.arange(n_active) + window
    tail_at = 2 * (active_end + 1) + np.arange(n_windows)
    pieces[gap_at], lengths[gap_at] = zero_runs[gap], 4 * gap
    pieces[gap_at + 1], lengths[gap_at + 1] = texts + ",", text_lengths + 1
    pieces[tail_at], lengths[tail_at] = zero_runs[tail], 4 * tail
    ends = np.cumsum(lengths)[tail_at]
    starts = np.concatenate([[0], ends[:-1]])
    return "".join(pieces.tolist()), starts, ends - 1  # each window's text ends with a comma: leave it out


def repeated_windows(feature_first: np.ndarray, seq: np.ndarray, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Per example: does its window overlap an earlier example's window of the same feature and sequence?"""
    n_examples = len(seq)
    rank = np.repeat(np.arange(len(feature_first) - 1), np.diff(feature_first))
    slot = np.arange(n_examples) - feature_first[rank]
    width = int(slot.max(initial=0)) + 1
    earlier = np.tri(width, width, -1, dtype=bool)
    repeated = np.zeros(n_examples, dtype=bool)
    step = max(1, _PAIR_BUDGET // (width * width))
    for f0 in range(0, len(feature_first) - 1, step):
        f1 = min(f0 + step, len(feature_first) - 1)
        chosen = slice(feature_first[f0], feature_first[f1])
        row, col = rank[chosen] - f0, slot[chosen]
        grid_seq = np.full((f1 - f0, width), -1, dtype=np.int64)
        grid_first = np.zeros((f1 - f0, width), dtype=np.int64)
        grid_last = np.full((f1 - f0, width), -1, dtype=np.int64)
        grid_seq[row, col], grid_first[row, col], grid_last[row, col] = seq[chosen], first[chosen], last[chosen]
        overlap = ((grid_seq[:, :, None] == grid_seq[:, None, :]) & (grid_first[:, None, :] <= grid_last[:, :, None])
                   & (grid_first[:, :, None] <= grid_last[:, None, :]) & earlier)
        repeated[chosen] = overlap.any(axis=2)[row, col]
    return repeated
