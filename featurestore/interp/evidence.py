"""Evidence for the judges from the store, built for a batch of features of one layer at a time.

Per-feature store calls cost tens of milliseconds each, which would cap a judge run well below what an
endpoint serves at 32 concurrent requests; so statistics, logit lens, top and quantile samples, domain
and region counts and the token windows of a whole batch come from a handful of SQL queries over the
store's views (through a cursor of its own, so the builder can run in a background thread). Windows are
assembled exactly as ``Feature.examples_at`` does: display text from the ``tokens`` view, this feature's
activation at every window token, clipped to the sequence. The judges read the windows as text, so a
character split across byte-level tokens is merged (``featurestore.text.merge_partial_bytes``: it shows on
the token that completes it) instead of reaching them as ``\\xNN`` escapes.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..features import Example
from ..text import merge_partial_bytes
from ..views import activation_scan


@dataclass
class EvidenceSettings:
    before: int = 50  # window tokens before the example's token
    after: int = 20
    n_top: int = 10  # top examples shown (classify) or explained (autointerp)
    n_lower: int = 5  # lower-quantile examples shown / explained
    n_quantiles: int = 10  # equal-count activation quantiles; "lower" = all but the top one
    n_test_top: int = 5  # autointerp held-out positives per condition
    n_test_lower: int = 5
    negatives_per_positive: int = 1
    top_pool: int = 40  # the top examples split between explanation and test


@dataclass
class FeatureEvidence:
    source: str
    layer: int
    feature: int
    stats: dict
    top: list[Example]
    lower: list[tuple[int, Example]]  # (quantile 1..n_quantiles, example)
    n_quantiles: int
    logit_top: list[tuple[str, float]] = field(default_factory=list)
    logit_bottom: list[tuple[str, float]] = field(default_factory=list)
    domain_counts: dict[str, int] = field(default_factory=dict)
    region_counts: dict[str, int] = field(default_factory=dict)
    domain_baseline: dict[str, int] = field(default_factory=dict)
    region_baseline: dict[str, int] = field(default_factory=dict)

    def shown(self) -> list[Example]:
        return self.top + [ex for _, ex in self.lower]


Row = tuple  # (seq_id, pos, act)
EDGE = 3  # tokens decoded beyond each end of a window: a UTF-8 character spans at most 4 byte-level tokens


def windows_conflict(a: tuple[int, int], b: tuple[int, int], span: int) -> bool:
    """Two examples' windows share a token (same sequence, anchors at most before+after apart)."""
    return a[0] == b[0] and abs(a[1] - b[1]) <= span


def is_free(candidate: tuple[int, int], taken: list[tuple[int, int]], span: int) -> bool:
    return not any(windows_conflict(candidate, t, span) for t in taken)


def _ints(values) -> str:
    return "(" + ", ".join(str(int(v)) for v in values) + ")"


class EvidenceBuilder:
    """Batched evidence queries over one store and source, on a private DuckDB cursor."""

    def __init__(self, store, source: str, settings: EvidenceSettings, seed: int):
        self.store, self.source, self.settings, self.seed = store, source, settings, seed
        self.con = store.con.cursor()
        self.con.execute("SET parquet_metadata_cache = true")  # store files are immutable once renamed in
        self.covered = self._covered_predicate()
        self._baseline: tuple[dict, dict] | None = None
        # only tokens holding part of a UTF-8 character need their bytes; the others read as their display text
        self._partial = dict(self.con.execute("SELECT token_id, raw FROM vocab WHERE partial_utf8 AND raw IS NOT NULL").fetchall())

    def close(self) -> None:
        self.con.close()

    # ---- store-level facts
    def _covered_predicate(self) -> str:
        """SQL over ``seq_id``: the sequences this source's activations were collected on (chunk row ranges)."""
        ranges = sorted(tuple(c["rows"]) for c in self.store.manifest["chunks"] if c["source"] == self.source)
        merged: list[list[int]] = []
        for start, stop in ranges:
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        if not merged:
            return "false"
        return "(" + " OR ".join(f"(seq_id >= {a} AND seq_id < {b})" for a, b in merged) + ")"

    def covered_on(self, alias: str) -> str:
        return self.covered.replace("seq_id", f"{alias}.seq_id")

    def baseline(self) -> tuple[dict, dict]:
        """Tokens per domain and per region over the covered sequences (the denominators shown to the judge)."""
        if self._baseline is None:
            domains = dict(self.con.execute(f"SELECT coalesce(domain, '?'), sum(n_tokens)::BIGINT FROM sequences "
                                            f"WHERE {self.covered} GROUP BY 1").fetchall())
            regions = dict(self.con.execute(f"SELECT region, count(*) FROM tokens WHERE {self.covered} GROUP BY 1").fetchall())
            self._baseline = (domains, regions)
        return self._baseline

    def scan(self, layer: int) -> str:
        return activation_scan(self.store.manifest_obj, self.source, layer)

    # ---- batched per-feature queries
    def stats(self, layer: int, features: list[int]) -> dict[int, dict]:
        rows = self.con.execute(
            "SELECT feature, activation_count, activation_freq, max_act, mean_act FROM features "
            f"WHERE source = ? AND layer = ? AND feature IN {_ints(features)}", [self.source, layer]).fetchall()
        keys = ("activation_count", "activation_freq", "max_act", "mean_act")
        return {r[0]: dict(zip(keys, r[1:])) for r in rows}

    def logit_lens(self, layer: int, features: list[int]) -> dict[int, dict[str, list]]:
        out: dict[int, dict[str, list]] = {f: {"top": [], "bottom": []} for f in features}
        rows = self.con.execute(
            "SELECT feature, side, token, value FROM logit_lens "
            f"WHERE source = ? AND layer = ? AND feature IN {_ints(features)} ORDER BY feature, side, rank",
            [self.source, layer]).fetchall()
        for feature, side, token, value in rows:
            out[feature][side].append((token, float(value)))
        return out

    def distribution(self, layer: int, features: list[int]) -> dict[int, tuple[dict, dict]]:
        out: dict[int, tuple[dict, dict]] = {f: ({}, {}) for f in features}
        rows = self.con.execute(
            f"SELECT a.feature, coalesce(s.domain, '?'), t.region, count(*) FROM {self.scan(layer)} a "
            "JOIN sequences s ON s.seq_id = a.seq_id JOIN tokens t ON t.seq_id = a.seq_id AND t.pos = a.pos "
            f"WHERE a.feature IN {_ints(features)} GROUP BY ALL").fetchall()
        for feature, domain, region, n in rows:
            domains, regions = out[feature]
            domains[domain] = domains.get(domain, 0) + n
            regions[region] = regions.get(region, 0) + n
        return out

    def top_rows(self, layer: int, features: list[int], k: int) -> dict[int, list[Row]]:
        rows = self.con.execute(
            f"SELECT feature, seq_id, pos, act FROM {self.scan(layer)} WHERE feature IN {_ints(features)} "
            "QUALIFY row_number() OVER (PARTITION BY feature ORDER BY act DESC, seq_id, pos) <= ? "
            "ORDER BY feature, act DESC, seq_id, pos", [k]).fetchall()
        out: dict[int, list[Row]] = {f: [] for f in features}
        for feature, seq_id, pos, act in rows:
            out[feature].append((seq_id, pos, act))
        return out

    def quantile_rows(self, layer: int, features: list[int], per_quantile: int) -> dict[int, dict[int, list[Row]]]:
        """Seeded samples from each equal-count activation quantile of each feature (1 = weakest)."""
        rows = self.con.execute(
            f"""SELECT feature, q, seq_id, pos, act FROM (
                    SELECT feature, seq_id, pos, act,
                           ntile(?) OVER (PARTITION BY feature ORDER BY act, seq_id, pos) AS q
                    FROM {self.scan(layer)} WHERE feature IN {_ints(features)})
                QUALIFY row_number() OVER (PARTITION BY feature, q ORDER BY hash(seq_id, pos, ?::BIGINT), seq_id, pos) <= ?
                ORDER BY feature, q, hash(seq_id, pos, ?::BIGINT), seq_id, pos""",
            [self.settings.n_quantiles, self.seed, per_quantile, self.seed]).fetchall()
        out: dict[int, dict[int, list[Row]]] = {f: {} for f in features}
        for feature, q, seq_id, pos, act in rows:
            out[feature].setdefault(q, []).append((seq_id, pos, act))
        return out

    def pick_lower(self, pools: dict[int, list[Row]], n: int, taken: list[tuple[int, int]]) -> list[tuple[int, Row]]:
        """n rows spread over the lower quantiles (highest first), none overlapping ``taken`` windows (which grows)."""
        q_max = self.settings.n_quantiles
        if n <= 0 or q_max < 2:
            return []
        targets = [int(round(x)) for x in np.linspace(q_max - 1, 1, n)] if n > 1 else [q_max - 1]
        span = self.settings.before + self.settings.after
        chosen = []
        for target in targets:
            for q in sorted(range(1, q_max), key=lambda q: (abs(q - target), -q)):
                pick = next((r for r in pools.get(q, []) if is_free((r[0], r[1]), taken, span)), None)
                if pick is not None:
                    pools[q].remove(pick)
                    taken.append((pick[0], pick[1]))
                    chosen.append((q, pick))
                    break
        return chosen

    # ---- windows
    def windows(self, layer: int, wanted: list[tuple[int, int, int, int, int]]) -> list[Example]:
        """``wanted`` = (feature, seq_id, pos, before, after) → Examples, in order, like ``Feature.examples_at``."""
        if not wanted:
            return []
        spans = pa.table({"seq_id": pa.array([w[1] for w in wanted], pa.int32()),
                          "lo": pa.array([max(0, w[2] - w[3] - EDGE) for w in wanted], pa.int32()),
                          "hi": pa.array([w[2] + w[4] + EDGE for w in wanted], pa.int32())})
        features = sorted({w[0] for w in wanted})
        self.con.register("_interp_windows", spans)
        try:
            inside = "EXISTS (SELECT 1 FROM _interp_windows w WHERE w.seq_id = {0}.seq_id AND {0}.pos BETWEEN w.lo AND w.hi)"
            token_rows = self.con.execute(
                f"SELECT t.seq_id, t.pos, t.token_id, t.token, t.region FROM tokens t WHERE {inside.format('t')}").fetchall()
            act_rows = self.con.execute(
                f"SELECT a.feature, a.seq_id, a.pos, a.act FROM {self.scan(layer)} a "
                f"WHERE a.feature IN {_ints(features)} AND {inside.format('a')}").fetchall()
            domains = dict(self.con.execute(
                "SELECT seq_id, domain FROM sequences WHERE seq_id IN (SELECT seq_id FROM _interp_windows)").fetchall())
        finally:
            self.con.unregister("_interp_windows")
        tokens: dict[tuple[int, int], tuple] = {(s, p): (tid, text, region) for s, p, tid, text, region in token_rows}
        acts = {(f, s, p): float(a) for f, s, p, a in act_rows}
        out = []
        for feature, seq_id, pos, before, after in wanted:
            window = [p for p in range(max(0, pos - before), pos + after + 1) if (seq_id, p) in tokens]
            token_ids = [tokens[seq_id, p][0] for p in window]
            texts = [tokens[seq_id, p][1] for p in window]
            if any(t in self._partial for t in token_ids):
                texts = self._readable(tokens, seq_id, window)
            out.append(Example(
                seq_id=seq_id, pos=pos, act=acts.get((feature, seq_id, pos), 0.0),
                token_ids=token_ids, tokens=texts,
                acts=[acts.get((feature, seq_id, p), 0.0) for p in window],
                train_token_ind=window.index(pos) if pos in window else -1,
                domain=domains.get(seq_id) or "", region=tokens[seq_id, pos][2] if (seq_id, pos) in tokens else ""))
        return out

    def _readable(self, tokens: dict, seq_id: int, window: list[int]) -> list[str]:
        """The window's display strings with split characters merged, decoded with EDGE tokens of context on
        each side: a character cut by the window's start shows whole, one cut by its end is left out."""
        context = [p for p in range(window[0] - EDGE, window[-1] + EDGE + 1) if (seq_id, p) in tokens]
        ids = [tokens[seq_id, p][0] for p in context]
        merged = dict(zip(context, merge_partial_bytes([self._partial.get(t) for t in ids],
                                                       [tokens[seq_id, p][1] for p in context])))
        return [merged[p] for p in window]

    # ---- evidence per batch
    def _assemble(self, layer: int, chosen: dict[int, tuple[list[Row], list[tuple[int, Row]]]]) -> dict[int, FeatureEvidence]:
        features = sorted(chosen)
        s = self.settings
        wanted = [(f, r[0], r[1], s.before, s.after) for f in features
                  for r in chosen[f][0] + [row for _, row in chosen[f][1]]]
        examples = iter(self.windows(layer, wanted))
        stats, lens, dist = self.stats(layer, features), self.logit_lens(layer, features), self.distribution(layer, features)
        base_domains, base_regions = self.baseline()
        out = {}
        for f in features:
            top_rows, lower_rows = chosen[f]
            top = [next(examples) for _ in top_rows]
            lower = [(q, next(examples)) for q, _ in lower_rows]
            out[f] = FeatureEvidence(self.source, layer, f, stats.get(f, {}), top, lower, s.n_quantiles,
                                     lens[f]["top"], lens[f]["bottom"], dist[f][0], dist[f][1], base_domains, base_regions)
        return out

    def for_classification(self, layer: int, features: list[int]) -> dict[int, FeatureEvidence]:
        s = self.settings
        tops = self.top_rows(layer, features, s.n_top)
        quantiles = self.quantile_rows(layer, features, 3) if s.n_lower else {f: {} for f in features}
        chosen = {}
        for f in features:
            taken = [(r[0], r[1]) for r in tops[f]]
            chosen[f] = (tops[f], self.pick_lower(quantiles[f], s.n_lower, taken))
        return self._assemble(layer, chosen)

    def split_for_autointerp(self, layer: int, features: list[int]) -> dict[int, tuple[tuple, dict[str, list[Row]]]]:
        """Per feature: the explainer's (top, lower) rows and the held-out positives per condition.

        Held-out top positives are a seeded random subset of the top pool; the explainer gets the strongest
        remaining ones. No held-out window shares a token with any window the explainer sees.
        """
        s = self.settings
        span = s.before + s.after
        pools = self.top_rows(layer, features, max(s.top_pool, 2 * (s.n_test_top + s.n_top)))  # room for larger test sets
        per_quantile = max(6, -(-2 * (s.n_test_lower + s.n_lower) // max(1, s.n_quantiles - 1)))
        quantiles = self.quantile_rows(layer, features, per_quantile)
        out = {}
        for f in features:
            pool = pools[f]
            shuffled = pool[:]
            random.Random(f"{self.seed}:{self.source}:{layer}:{f}").shuffle(shuffled)
            test_top: list[Row] = []
            for row in shuffled:
                if len(test_top) < s.n_test_top and is_free((row[0], row[1]), [(r[0], r[1]) for r in test_top], span):
                    test_top.append(row)
            held = [(r[0], r[1]) for r in test_top]
            explain_top = [r for r in pool if is_free((r[0], r[1]), held, span)][:s.n_top]
            taken = held + [(r[0], r[1]) for r in explain_top]
            test_lower = self.pick_lower(quantiles[f], s.n_test_lower, taken)
            explain_lower = self.pick_lower(quantiles[f], s.n_lower, taken)
            out[f] = ((explain_top, explain_lower), {"top": test_top, "lower": [r for _, r in test_lower]})
        return out
