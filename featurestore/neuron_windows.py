"""Neuron example windows: the true activation of a neuron at every token around its example positions.

Neurons are dense, so the store cannot keep every activation; the ``activations`` table keeps only each
sequence's top 20 positions per neuron (the original's rows). To give every example window the neuron's real
values (negative ones included), collection keeps, per chunk and neuron, the windows (``WINDOW_BEFORE`` tokens
before to ``WINDOW_AFTER`` after, as dense lists) of two sets of candidate positions:

- ``top``: the chunk's ``top_k`` largest positive activations. The store-wide top k is always among the union of
  the chunks' top k, so the exported "Top activations" are exact.
- ``sample_key``: a uniform sample of the chunk's positive activations: the ``n_sample`` smallest values of a
  seeded hash of (seq_id, pos, neuron). Taking the ``n_sample`` smallest keys over all chunks gives a uniform
  sample (without replacement) of all the neuron's positive activations (a bottom-k sketch): what "Random
  samples", the interval groups, ``quantile_values`` and the histogram of a neuron are computed from.

Both are decided per chunk from that chunk's tokens only, so a resumed or distributed run writes the same rows.
This module is torch-free at import (the capture functions import torch when called).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import schema

WINDOW_BEFORE, WINDOW_AFTER = 50, 20
WINDOW = WINDOW_BEFORE + 1 + WINDOW_AFTER
TOP_PER_CHUNK = 20
SAMPLE_PER_CHUNK = 32
NO_KEY = np.iinfo(np.int64).max
_M32 = 0xFFFFFFFF


def _mix(x):
    """A 32-bit integer hash step (values stay below 2**59, so int64 tensor arithmetic never overflows)."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def sample_keys(seq_ids, length: int, units, seed: int):
    """(B, T, n) int64 keys in [0, 2**63) of (seq_id, pos, neuron index, seed): the uniform sample's order."""
    import torch

    s = seq_ids.long()[:, None, None]
    p = torch.arange(length, device=seq_ids.device, dtype=torch.long)[None, :, None]
    u = units.long()[None, None, :]
    h1 = _mix(_mix(_mix(_mix(s ^ (int(seed) & _M32)) ^ p) ^ u) ^ 0x2545F491)
    h2 = _mix(h1 ^ 0x9E3779B9)
    return (h1 << 31) | (h2 & 0x7FFFFFFF)


def _run_position(group: np.ndarray) -> np.ndarray:
    """0, 1, .. within each run of equal values of an already grouped array."""
    if len(group) == 0:
        return np.zeros(0, dtype=np.int64)
    start = np.ones(len(group), dtype=bool)
    start[1:] = group[1:] != group[:-1]
    index = np.arange(len(group))
    return index - np.maximum.accumulate(np.where(start, index, 0))


class WindowAccumulator:
    """One (neuron layer, chunk): the running top-k and sample candidates with their windows (bounded memory)."""

    def __init__(self, units: np.ndarray, top_k: int = TOP_PER_CHUNK, n_sample: int = SAMPLE_PER_CHUNK, seed: int = 0):
        self.units, self.top_k, self.n_sample, self.seed = np.asarray(units), top_k, n_sample, seed
        self._units_t = None
        self.reset()

    def reset(self) -> None:
        self.unit = np.zeros(0, np.int64)
        self.seq = np.zeros(0, np.int64)
        self.pos = np.zeros(0, np.int64)
        self.top = np.zeros(0, bool)
        self.key = np.zeros(0, np.int64)
        self.win = np.zeros((0, WINDOW), np.float32)

    def add_batch(self, acts, valid, seq_ids) -> None:
        """``acts`` (B, T, n) float32, ``valid`` (B, T) bool, ``seq_ids`` (B,) int: all on the model's device."""
        import torch

        B, T, n = acts.shape
        if self._units_t is None or self._units_t.device != acts.device:
            self._units_t = torch.as_tensor(self.units, dtype=torch.long, device=acts.device)
        positive = (acts > 0) & valid[:, :, None]
        flat_pos = positive.reshape(B * T, n)
        picked = torch.zeros((B * T, n), dtype=torch.bool, device=acts.device)
        is_top = torch.zeros_like(picked)
        if self.top_k:
            values, index = acts.reshape(B * T, n).masked_fill(~flat_pos, float("-inf")).topk(min(self.top_k, B * T), dim=0)
            is_top.scatter_(0, index, values > float("-inf"))
        keys = sample_keys(seq_ids, T, self._units_t, self.seed).reshape(B * T, n).masked_fill(~flat_pos, NO_KEY)
        in_sample = torch.zeros_like(picked)
        if self.n_sample:
            values, index = keys.topk(min(self.n_sample, B * T), dim=0, largest=False)
            in_sample.scatter_(0, index, values < NO_KEY)
        picked = is_top | in_sample
        token, unit = picked.nonzero(as_tuple=True)
        b, t = token // T, token % T
        padded = torch.nn.functional.pad(acts.masked_fill(~valid[:, :, None], float("nan")).permute(0, 2, 1),
                                         (WINDOW_BEFORE, WINDOW_AFTER), value=float("nan"))  # (B, n, T + W - 1)
        offsets = torch.arange(WINDOW, device=acts.device)
        win = padded[b[:, None], unit[:, None], t[:, None] + offsets[None, :]]
        key = torch.where(in_sample[token, unit], keys[token, unit], NO_KEY)
        self._merge(unit.cpu().numpy().astype(np.int64), seq_ids[b].cpu().numpy().astype(np.int64),
                    t.cpu().numpy().astype(np.int64), is_top[token, unit].cpu().numpy(), key.cpu().numpy(),
                    win.float().cpu().numpy())

    def _merge(self, unit, seq, pos, top, key, win) -> None:
        """Keep per unit the ``top_k`` best top candidates and the ``n_sample`` smallest sample keys so far."""
        unit = np.concatenate([self.unit, unit])
        seq, pos = np.concatenate([self.seq, seq]), np.concatenate([self.pos, pos])
        top, key = np.concatenate([self.top, top]), np.concatenate([self.key, key])
        win = np.concatenate([self.win, win])
        act = win[:, WINDOW_BEFORE]
        order = np.lexsort((pos, seq, -np.where(top, act, -np.inf), unit))  # by unit, act desc, seq, pos
        keep_top = np.zeros(len(unit), bool)
        keep_top[order] = top[order] & (_run_position(unit[order]) < self.top_k)
        order = np.lexsort((key, unit))
        keep_sample = np.zeros(len(unit), bool)
        keep_sample[order] = (key[order] < NO_KEY) & (_run_position(unit[order]) < self.n_sample)
        keep = keep_top | keep_sample
        self.unit, self.seq, self.pos, self.win = unit[keep], seq[keep], pos[keep], win[keep]
        self.top, self.key = keep_top[keep], np.where(keep_sample, key, NO_KEY)[keep]

    def take_table(self) -> pa.Table:
        """The chunk's rows (sorted by feature, seq_id, pos); the accumulator starts over."""
        valid = ~np.isnan(self.win)
        lengths = valid.sum(axis=1)
        first = valid.argmax(axis=1)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        acts = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(self.win[valid], pa.float32()))
        table = pa.table({
            "feature": self.units[self.unit].astype(np.int32), "seq_id": self.seq.astype(np.int32),
            "pos": self.pos.astype(np.int32), "act": self.win[:, WINDOW_BEFORE].astype(np.float32), "top": self.top,
            "sample_key": pa.array(self.key, pa.int64(), mask=self.key == NO_KEY),
            "start": (self.pos - WINDOW_BEFORE + first).astype(np.int32), "acts": acts,
        }, schema=schema.NEURON_WINDOWS)
        self.reset()
        return table.sort_by([("feature", "ascending"), ("seq_id", "ascending"), ("pos", "ascending")])


# ---- reading (the Python API; exports read the same rows in exporters/neuron_examples.py)

MIN_TOP_ACT = 0.01  # the original's threshold for a neuron's top examples (capture.NEURON_MIN_ACT)


def top_rows_sql(k: int) -> str:
    """(seq_id, pos, act) of a neuron's top ``k`` activations; parameters: layer, feature."""
    return (f"SELECT seq_id, pos, act FROM neuron_windows WHERE source = 'neuron' AND layer = ? AND feature = ? "
            f"AND top AND act > {MIN_TOP_ACT} ORDER BY act DESC, seq_id, pos LIMIT {int(k)}")


def sample_rows_sql(n_sample: int, order_sql: str, n: int) -> str:
    """(seq_id, pos, act) of ``n`` of a neuron's store-wide uniform sample of ``n_sample`` positive activations, in
    ``order_sql`` (the seeded random order); parameters: layer, feature."""
    return (f"SELECT seq_id, pos, act FROM (SELECT feature, seq_id, pos, act FROM neuron_windows "
            f"WHERE source = 'neuron' AND layer = ? AND feature = ? AND sample_key IS NOT NULL "
            f"ORDER BY sample_key, seq_id, pos LIMIT {int(n_sample)}) ORDER BY {order_sql} LIMIT {int(n)}")


WINDOW_VALUES_SQL = """SELECT DISTINCT seq_id, start + i - 1 AS pos, acts[i] AS act FROM (
    SELECT seq_id, start, acts, generate_subscripts(acts, 1) AS i FROM neuron_windows
    WHERE source = 'neuron' AND layer = ? AND feature = ? AND seq_id IN (SELECT unnest(?::INTEGER[])))"""
"""A neuron's stored true activations in the given sequences (its window tokens only); parameters: layer,
feature, seq_ids."""
