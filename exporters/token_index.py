"""Every stored token id in one flat array, so that example windows are array slices, not joins.

Loaded once per export with a single ordered scan of ``tokens`` (4 bytes per token). Worker processes share it
through a memory-mapped ``.npy`` file instead of each holding a copy.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featurestore import views

from .feature_queries import tokens_scan


@dataclass
class TokenIndex:
    token_ids: np.ndarray  # int32, every token in (seq_id, pos) order
    seq_start: np.ndarray  # int64 per seq_id: offset of its first token (-1 where the store has no such sequence)
    seq_len: np.ndarray  # int64 per seq_id: number of tokens

    @classmethod
    def load(cls, store, seq_ids: np.ndarray | None = None) -> "TokenIndex":
        """All tokens, or only those of ``seq_ids`` (what a single-feature document needs)."""
        if seq_ids is not None:  # only the row groups of these sequences
            table = views.sequence_tokens(store.manifest_obj, seq_ids, ["seq_id", "pos", "token_id"])
            columns = {name: table.column(name).to_numpy() for name in ("seq_id", "token_id")}
        else:
            con = store.con.cursor()
            try:
                columns = con.execute(f"SELECT seq_id, token_id FROM {tokens_scan(store)} ORDER BY seq_id, pos").fetchnumpy()
            finally:
                con.close()
        seqs = np.asarray(columns["seq_id"], dtype=np.int64)
        size = int(seqs.max()) + 1 if len(seqs) else 0
        seq_len = np.bincount(seqs, minlength=size).astype(np.int64)
        seq_start = np.cumsum(seq_len) - seq_len
        seq_start[seq_len == 0] = -1
        return cls(np.asarray(columns["token_id"], dtype=np.int32), seq_start, seq_len)

    def save(self, directory: Path) -> None:
        for name in ("token_ids", "seq_start", "seq_len"):
            np.save(directory / f"{name}.npy", getattr(self, name))

    @classmethod
    def open(cls, directory: str | os.PathLike) -> "TokenIndex":
        directory = Path(directory)
        return cls(*(np.load(directory / f"{name}.npy", mmap_mode="r") for name in ("token_ids", "seq_start", "seq_len")))

    def clip(self, seq: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows [lo, hi] clipped to each sequence's tokens."""
        return np.maximum(lo, 0), np.minimum(hi, self.seq_len[seq] - 1)

    def gather(self, seq: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of many windows at once: (offsets of each window in the flat result, flat token ids)."""
        lengths = hi - lo + 1
        offsets = np.zeros(len(seq) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        source = np.repeat(self.seq_start[seq] + lo - offsets[:-1], lengths) + np.arange(offsets[-1])
        return offsets, np.asarray(self.token_ids[source])
