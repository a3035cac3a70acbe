"""Exact per-chunk counts of each neuron's positive activations by domain, region and thinking-position bin.

``feature_metadata.json`` breaks each unit's activation count down by domain, region and thinking bin. For
transcoder features it counts the stored rows, which are every activation; a neuron's stored rows are only its
per-sequence top 20, so its breakdown is counted during collection over every token instead (the
``neuron_counts`` table), and the metadata's densities and fractions agree with the exact ``activation_count``.
Torch-free at import.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import schema
from .regions import thinking_bin

N_BINS = 10


def token_groups(tokens: pa.Table, sequences: pa.Table, seq_ids: list[int]) -> dict[int, tuple]:
    """Per sequence: (region codes, thinking bins with -1 where none, domain) from a chunk's tokens/sequences."""
    seq = tokens.column("seq_id").to_numpy()
    region = tokens.column("region").combine_chunks()
    codes = np.asarray(region.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    names = region.dictionary.to_pylist()
    codes = np.array([schema.REGIONS.index(n) for n in names], dtype=np.int64)[codes]  # as schema.REGIONS order
    tpos = tokens.column("thinking_pos").to_numpy(zero_copy_only=False)
    bins = np.where(np.isnan(tpos), -1, thinking_bin(np.nan_to_num(tpos, nan=0.0)))
    domains = dict(zip(sequences.column("seq_id").to_pylist(), sequences.column("domain").to_pylist()))
    cuts = np.flatnonzero(np.diff(seq)) + 1
    firsts = np.concatenate([[0], cuts])
    out = {}
    for first, stop in zip(firsts.tolist(), np.append(cuts, len(seq)).tolist()):
        s = int(seq[first])
        out[s] = (codes[first:stop], bins[first:stop], domains.get(s) or "")
    return {s: out[s] for s in seq_ids if s in out}


class CountAccumulator:
    """One (neuron layer, chunk): positive-activation counts by region, thinking bin and domain."""

    def __init__(self, n_units: int):
        self.n_units = n_units
        self.reset()

    def reset(self) -> None:
        self.region = np.zeros((len(schema.REGIONS), self.n_units), np.int64)
        self.bins = np.zeros((N_BINS, self.n_units), np.int64)
        self.domain: dict[str, np.ndarray] = {}

    def add_batch(self, positive, region, bins, domains: list[str]) -> None:
        """``positive`` (B, T, n) bool; ``region``/``bins`` (B, T) long (padding: -1); ``domains`` per row."""
        import torch

        p = positive.to(torch.float32)
        for values, width, out in ((region, len(schema.REGIONS), self.region), (bins, N_BINS, self.bins)):
            onehot = torch.nn.functional.one_hot(values.clamp(min=0), width).to(torch.float32) * (values >= 0)[..., None]
            out += torch.einsum("btk,btn->kn", onehot, p).round().long().cpu().numpy()
        per_row = p.sum(dim=1).round().long().cpu().numpy()  # (B, n)
        for row, name in enumerate(domains):
            self.domain[name] = self.domain.get(name, 0) + per_row[row]

    def take_table(self, unit_ids: np.ndarray) -> pa.Table:
        parts = []
        for kind, names, counts in (("region", list(schema.REGIONS), self.region), ("bin", [str(b) for b in range(N_BINS)], self.bins),
                                    ("domain", sorted(self.domain), np.array([self.domain[d] for d in sorted(self.domain)],
                                                                             np.int64).reshape(-1, self.n_units))):
            k, unit = np.nonzero(counts)
            parts.append((unit_ids[unit].astype(np.int32), np.full(len(k), kind, object), np.asarray(names, object)[k]
                          if len(k) else np.zeros(0, object), counts[k, unit]))
        self.reset()
        cols = [np.concatenate([p[i] for p in parts]) for i in range(4)]
        table = pa.table({"feature": pa.array(cols[0], pa.int32()), "kind": pa.array(cols[1], pa.string()),
                          "key": pa.array(cols[2], pa.string()), "n_active": pa.array(cols[3], pa.int64())},
                         schema=schema.NEURON_COUNTS)
        return table.sort_by([("feature", "ascending"), ("kind", "ascending"), ("key", "ascending")])
