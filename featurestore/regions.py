"""Token regions of a reasoning trace (bos, question, thinking, answer, ...) and relative thinking position.

Markers are the first occurrences of BOS, <｜User｜>, <｜Assistant｜>, <think> and </think>, searched up to
the first </think>. Marker positions get their own region; ``question`` is every other position before the
assistant marker, ``thinking`` lies strictly between <think> and </think>, ``answer`` after </think>, and
``unknown`` is the rest. A trace cut before its </think> (truncated or incomplete) keeps ``thinking`` after
<think> but has no relative position there, since its end is unknown.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .schema import REGIONS

REGION_CODE = {name: i for i, name in enumerate(REGIONS)}
MARKERS = ("bos", "user_marker", "assistant_marker", "think_start", "think_end")


@dataclass(frozen=True)
class MarkerIds:
    bos: int | None
    user_marker: int | None
    assistant_marker: int | None
    think_start: int | None
    think_end: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MarkerIds":
        def single(text: str) -> int | None:
            ids = tokenizer.encode(text, add_special_tokens=False)
            return ids[0] if len(ids) == 1 else None

        return cls(tokenizer.bos_token_id, single("<｜User｜>"), single("<｜Assistant｜>"), single("<think>"), single("</think>"))


def _first(ids: np.ndarray, token: int | None) -> int | None:
    if token is None:
        return None
    hits = np.flatnonzero(ids == token)
    return int(hits[0]) if len(hits) else None


def find_markers(ids: np.ndarray, marker_ids: MarkerIds) -> dict[str, int | None]:
    te = _first(ids, marker_ids.think_end)
    scope = ids if te is None else ids[: te + 1]
    found = {name: _first(scope, getattr(marker_ids, name)) for name in MARKERS}
    found["think_end"] = te
    if found["bos"] is not None and found["bos"] != 0:
        found["bos"] = None  # a BOS id in the middle of text is not the sequence start
    return found


def assign_regions(n: int, markers: dict[str, int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Region codes (int8, indices into REGIONS) and thinking positions (float32, NaN outside thinking)."""
    region = np.full(n, REGION_CODE["unknown"], dtype=np.int8)
    thinking_pos = np.full(n, np.nan, dtype=np.float32)
    pos = np.arange(n)
    am, ts, te = markers["assistant_marker"], markers["think_start"], markers["think_end"]
    if am is not None:
        region[pos < am] = REGION_CODE["question"]
    if te is not None:
        region[pos > te] = REGION_CODE["answer"]
    if ts is not None:
        inside = (pos > ts) & (pos < te) if te is not None else pos > ts
        region[inside] = REGION_CODE["thinking"]
        if te is not None and te - ts - 1 > 0:
            thinking_pos[inside] = (pos[inside] - ts - 1) / (te - ts - 1)
    for name in MARKERS:
        if markers[name] is not None:
            region[markers[name]] = REGION_CODE[name]
    return region, thinking_pos


def thinking_bin(thinking_pos):
    """The original's 10 bins: min(9, floor(10 * rel))."""
    return np.minimum(9, np.floor(np.asarray(thinking_pos) * 10).astype(np.int64))
