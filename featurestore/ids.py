"""Feature identity: the circuit-tracer global id is the Cantor pair of (layer, feature)."""
from __future__ import annotations

import math


def cantor(layer: int, feature: int) -> int:
    """(l+f)(l+f+1)/2 + f, the id circuit-tracer uses in graph nodes, file names and pack lookups."""
    s = layer + feature
    return s * (s + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of :func:`cantor`, exact for any size (integer square root)."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature


CANTOR_SQL = "((layer + feature) * (layer + feature + 1) // 2 + feature)"
"""The same pairing as a DuckDB expression over columns named layer and feature (kept next to the Python one)."""
