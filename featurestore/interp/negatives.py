"""Detection sets: held-out positives plus verified non-activating windows from the store's own sequences.

A negative for a positive comes from a sequence this source was collected on, at a token of the same
domain and region, cut to the same number of tokens before and after (so the same window length and
the same clipping), and the feature's activation is exactly 0 at every one of those tokens — checked
against the activations table for the exact extents rendered, and checked again on the built window.
When no such window exists the match is relaxed (domain only, then anything) and the row says so.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import pyarrow as pa

from ..features import Example
from .evidence import EvidenceBuilder, _ints, is_free
from .prompts import excerpt_text

MATCH_LEVELS = ("domain+region", "domain", "any")


@dataclass
class DetectionSet:
    """What one detection request shows, in order: the rendered excerpts and, per excerpt, where it comes from,
    the truth and (negatives) how well it matches. Compact, so a run keeps it for the control pass."""

    condition: str
    texts: list[str]
    items: list[dict]  # seq_id, pos, window_start, window_end, label, act, match

    @property
    def labels(self) -> list[bool]:
        return [item["label"] for item in self.items]

    @property
    def n_positives(self) -> int:
        return sum(self.labels)

    @property
    def n_negatives(self) -> int:
        return len(self.items) - self.n_positives


def extent_key(example: Example) -> tuple[str, str, int, int]:
    """(domain, region, tokens before, tokens after) of a positive: what its negative must match."""
    before = example.train_token_ind
    return (example.domain or "?", example.region, before, len(example.tokens) - 1 - before)


class NegativeSampler:
    """Matched all-zero windows. Candidate anchors per (domain, region, extent) are drawn once per run and
    shared by all features (each feature walks them in its own seeded order); the zero check runs per
    feature on a few candidates at a time; a whole-store search is the fallback when a pool runs dry."""

    POOL = 2000  # candidate anchors kept per (domain, region, before, after)
    CHUNK = 48  # candidates checked for zeros per feature and key at a time

    def __init__(self, builder: EvidenceBuilder):
        self.b = builder
        self.span = builder.settings.before + builder.settings.after
        self._pools: dict[tuple, list[tuple[int, int]]] = {}
        self._slow: dict[tuple, list[tuple[int, int]]] = {}  # whole-store searches, per batch

    def _fill_pools(self, keys: list[tuple]) -> None:
        """Seeded candidate anchors per key (domain, region and extents matched; not yet checked for zeros)."""
        keys = [k for k in keys if k not in self._pools]
        if not keys:
            return
        table = pa.table({"key_id": list(range(len(keys))), "domain": [k[0] for k in keys],
                          "region": [k[1] for k in keys], "b": [k[2] for k in keys], "a": [k[3] for k in keys]})
        con = self.b.con
        con.register("_interp_keys", table)
        try:
            rows = con.execute(f"""
                SELECT k.key_id, t.seq_id, t.pos FROM tokens t
                JOIN sequences s ON s.seq_id = t.seq_id
                JOIN _interp_keys k ON coalesce(s.domain, '?') = k.domain AND t.region = k.region
                     AND t.pos >= k.b AND t.pos + k.a < s.n_tokens
                WHERE {self.b.covered_on('t')}
                QUALIFY row_number() OVER (PARTITION BY k.key_id ORDER BY hash(t.seq_id, t.pos, ?::BIGINT), t.seq_id, t.pos) <= ?
                ORDER BY k.key_id, hash(t.seq_id, t.pos, ?::BIGINT), t.seq_id, t.pos""",
                [self.b.seed, self.POOL, self.b.seed]).fetchall()
        finally:
            con.unregister("_interp_keys")
        for key in keys:
            self._pools[key] = []
        for key_id, seq_id, pos in rows:
            self._pools[keys[key_id]].append((seq_id, pos))

    def _fired(self, layer: int, pairs: list[tuple[int, int, int, int, int]]) -> set[tuple[int, int, int, int, int]]:
        """Of (feature, seq_id, pos, before, after), those where the feature fires anywhere in the window."""
        if not pairs:
            return set()
        table = pa.table({"feature": pa.array([p[0] for p in pairs], pa.int32()),
                          "seq_id": pa.array([p[1] for p in pairs], pa.int32()),
                          "pos": pa.array([p[2] for p in pairs], pa.int32()),
                          "b": pa.array([p[3] for p in pairs], pa.int32()),
                          "a": pa.array([p[4] for p in pairs], pa.int32())})
        con = self.b.con
        con.register("_interp_pairs", table)
        try:
            rows = con.execute(
                f"SELECT DISTINCT p.feature, p.seq_id, p.pos, p.b, p.a FROM _interp_pairs p "
                f"JOIN {self.b.scan(layer)} x ON x.feature = p.feature AND x.seq_id = p.seq_id "
                f"AND x.pos BETWEEN p.pos - p.b AND p.pos + p.a "
                f"WHERE x.feature IN {_ints(sorted({p[0] for p in pairs}))}").fetchall()
        finally:
            con.unregister("_interp_pairs")
        return {tuple(r) for r in rows}

    def _relaxed(self, layer: int, feature: int, key: tuple, level: str, limit: int) -> list[tuple[int, int]]:
        """Zero windows for one feature over the whole store at a match level (slow path, rare)."""
        domain, region, before, after = key
        conditions = [self.b.covered_on("t"), "t.pos >= ?", "t.pos + ? < s.n_tokens"]
        params: list = [before, after]
        if level in ("domain+region", "domain"):
            conditions.append("coalesce(s.domain, '?') = ?")
            params.append(domain)
        if level == "domain+region":
            conditions.append("t.region = ?")
            params.append(region)
        seed = self.b.seed * 7919 + feature
        rows = self.b.con.execute(f"""
            WITH fired AS (SELECT seq_id, pos FROM {self.b.scan(layer)} WHERE feature = ?)
            SELECT t.seq_id, t.pos FROM tokens t JOIN sequences s ON s.seq_id = t.seq_id
            WHERE {' AND '.join(conditions)}
              AND NOT EXISTS (SELECT 1 FROM fired f WHERE f.seq_id = t.seq_id AND f.pos BETWEEN t.pos - ? AND t.pos + ?)
            ORDER BY hash(t.seq_id, t.pos, ?::BIGINT), t.seq_id, t.pos LIMIT ?""",
            [feature, *params, before, after, seed, limit]).fetchall()
        return [(int(s), int(p)) for s, p in rows]

    def sample(self, layer: int, positives: dict[int, dict[str, list[Example]]],
               avoid: dict[int, list[tuple[int, int]]]) -> dict[int, dict[str, list[tuple[Example, str]]]]:
        """For each feature and condition, one verified negative (times negatives_per_positive) per positive."""
        per = self.b.settings.negatives_per_positive
        self._slow.clear()
        wanted_keys = {f: sorted({extent_key(ex) for exs in conds.values() for ex in exs}) for f, conds in positives.items()}
        self._fill_pools(sorted({k for keys in wanted_keys.values() for k in keys}))
        walks: dict[tuple, _Walk] = {}
        for feature, keys in wanted_keys.items():
            for key in keys:
                pool = self._pools[key]  # already in seeded random order: each feature starts at its own offset
                start = random.Random(f"{self.b.seed}:{layer}:{feature}:{key}").randrange(len(pool)) if pool else 0
                walks[feature, key] = _Walk(pool[start:] + pool[:start])
        self._check(layer, list(walks.items()))  # the first chunk of every walk in one query

        chosen: dict[int, dict[str, list[tuple[tuple, tuple[int, int], str]]]] = {}
        for feature, conditions in positives.items():
            taken = list(avoid.get(feature, []))
            chosen[feature] = {}
            for condition, examples in conditions.items():
                picks = chosen[feature][condition] = []
                for ex in examples:
                    key = extent_key(ex)
                    for _ in range(per):
                        pick = self._take(layer, feature, key, walks[feature, key], taken)
                        if pick is not None:
                            picks.append((key, *pick))
        wanted = [(f, c[0], c[1], key[2], key[3]) for f, conds in chosen.items() for picks in conds.values()
                  for key, c, _ in picks]
        windows = iter(self.b.windows(layer, wanted))
        out: dict[int, dict[str, list[tuple[Example, str]]]] = {}
        for feature, conds in chosen.items():
            out[feature] = {}
            for condition, picks in conds.items():
                built = [(next(windows), level) for _, _, level in picks]
                # second check on the window actually rendered: every token's activation must be exactly 0
                out[feature][condition] = [(ex, level) for ex, level in built if not any(ex.acts) and ex.train_token_ind >= 0]
        return out

    def _check(self, layer: int, walks: list[tuple[tuple, "_Walk"]]) -> None:
        """Zero-check the next CHUNK candidates of each walk (one query for all)."""
        pairs = []
        for (feature, key), walk in walks:
            batch = walk.order[walk.checked:walk.checked + self.CHUNK]
            pairs.extend((feature, s, p, key[2], key[3]) for s, p in batch)
            walk.checked += len(batch)
        by_extent: dict[tuple, list[_Walk]] = {}
        for (feature, key), walk in walks:
            by_extent.setdefault((feature, key[2], key[3]), []).append(walk)
        for feature, seq_id, pos, before, after in self._fired(layer, pairs):
            for walk in by_extent[feature, before, after]:
                walk.fired.add((seq_id, pos))

    def _take(self, layer: int, feature: int, key: tuple, walk: "_Walk",
              taken: list[tuple[int, int]]) -> tuple[tuple[int, int], str] | None:
        while True:
            while walk.next < walk.checked:
                cand = walk.order[walk.next]
                walk.next += 1
                if cand not in walk.fired and is_free(cand, taken, self.span):
                    taken.append(cand)
                    return cand, MATCH_LEVELS[0]
            if walk.checked >= len(walk.order):
                break
            self._check(layer, [((feature, key), walk)])
        for level in MATCH_LEVELS:  # the pool ran dry: search the whole store, relaxing the match if needed
            found = self._slow.get((layer, feature, key, level))
            if found is None:
                found = self._slow[layer, feature, key, level] = self._relaxed(layer, feature, key, level, 64)
            for i, cand in enumerate(found):
                if is_free(cand, taken, self.span):
                    del found[i]
                    taken.append(cand)
                    return cand, level
        return None


@dataclass
class _Walk:
    """One feature's seeded walk through a key's candidate pool; ``fired`` holds those found not all-zero."""

    order: list[tuple[int, int]]
    checked: int = 0
    next: int = 0
    fired: set = field(default_factory=set)


def assemble(layer: int, feature: int, condition: str, positives: list[Example], negatives: list[tuple[Example, str]],
             seed: int, source: str) -> DetectionSet:
    """Positives and negatives shuffled together (seeded) and rendered by the same function."""
    entries = [(ex, True, None) for ex in positives] + [(ex, False, level) for ex, level in negatives]
    random.Random(f"{seed}:{source}:{layer}:{feature}:{condition}").shuffle(entries)
    items = []
    for ex, label, match in entries:
        start = ex.pos - ex.train_token_ind
        items.append({"seq_id": ex.seq_id, "pos": ex.pos, "window_start": start, "window_end": start + len(ex.tokens) - 1,
                      "label": label, "act": ex.act, "match": match})
    return DetectionSet(condition, [excerpt_text(ex) for ex, _, _ in entries], items)
