"""A handle on one feature: its statistics, examples with context windows, and logit lens."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from . import neuron_windows
from .ids import cantor
from .views import RANDOM_ORDER_SQL, activation_scan

if TYPE_CHECKING:
    from .store import Store

CONTEXT_BEFORE, CONTEXT_AFTER = 50, 20


@dataclass
class Example:
    seq_id: int
    pos: int
    act: float
    token_ids: list[int]
    tokens: list[str]
    acts: list[float]  # this feature's activation at each window token (0.0 where inactive; neurons: true values)
    train_token_ind: int  # index of ``pos`` within the window
    domain: str
    region: str


class Feature:
    def __init__(self, store: "Store", layer: int, feature: int, source: str = "transcoder"):
        self.store, self.layer, self.feature, self.source = store, layer, feature, source

    def __repr__(self) -> str:
        return f"Feature(layer={self.layer}, feature={self.feature}, source={self.source!r})"

    @property
    def cantor_id(self) -> int:
        return cantor(self.layer, self.feature)

    def _scan(self) -> str:
        return activation_scan(self.store.manifest_obj, self.source, self.layer)

    def stats(self) -> dict | None:
        rows = self.store.con.execute(
            "SELECT activation_count, activation_freq, max_act, mean_act FROM features "
            "WHERE source = ? AND layer = ? AND feature = ?", [self.source, self.layer, self.feature]).fetchall()
        if not rows:
            return None
        return dict(zip(("activation_count", "activation_freq", "max_act", "mean_act"), rows[0]))

    def top_examples(self, k: int = 20, before: int = CONTEXT_BEFORE, after: int = CONTEXT_AFTER) -> list[Example]:
        if self.source == "neuron":  # the store-wide top k, with true-activation windows
            return self._windows(self.store.con.execute(neuron_windows.top_rows_sql(k), [self.layer, self.feature]).fetchall(),
                                 before, after)
        rows = self.store.con.execute(
            f"SELECT seq_id, pos, act FROM {self._scan()} WHERE feature = ? ORDER BY act DESC, seq_id, pos LIMIT ?",
            [self.feature, k]).fetchall()
        return self._windows(rows, before, after)

    def random_examples(self, n: int = 10, seed: int = 0, before: int = CONTEXT_BEFORE, after: int = CONTEXT_AFTER) -> list[Example]:
        """Uniform over this feature's activating tokens, in the store-wide seeded order (neurons: over the
        store's uniform sample of their positive activations, which carries their windows)."""
        if self.source == "neuron":
            sql = neuron_windows.sample_rows_sql(self._neuron_sample_size(), RANDOM_ORDER_SQL.format(seed=int(seed)), n)
            return self._windows(self.store.con.execute(sql, [self.layer, self.feature]).fetchall(), before, after)
        rows = self.store.con.execute(
            f"SELECT seq_id, pos, act FROM {self._scan()} WHERE feature = ? ORDER BY {RANDOM_ORDER_SQL.format(seed=int(seed))} LIMIT ?",
            [self.feature, n]).fetchall()
        return self._windows(rows, before, after)

    def examples_at(self, pairs: list[tuple[int, int]], before: int = CONTEXT_BEFORE, after: int = CONTEXT_AFTER) -> list[Example]:
        """Windows around any (seq_id, pos), active or not (e.g. negatives for detection scoring)."""
        if not pairs:
            return []
        acts = self._acts_in(sorted({s for s, _ in pairs}))
        return self._windows([(s, p, acts.get((s, p), 0.0)) for s, p in pairs], before, after, acts)

    def to_json(self, **options) -> dict | None:
        """The dashboard document ``export json`` writes for this feature (None if it never fired); ``options``
        are ``exporters.feature_documents.DocumentOptions`` fields (top_k, n_random, seed, before, after, ...)."""
        from exporters.feature_json import DocumentOptions, feature_document

        return feature_document(self.store, self.layer, self.feature, self.source, DocumentOptions(**options))

    def logit_lens(self) -> dict[str, list[tuple[str, float]]]:
        rows = self.store.con.execute(
            "SELECT side, token, value FROM logit_lens WHERE source = ? AND layer = ? AND feature = ? ORDER BY side, rank",
            [self.source, self.layer, self.feature]).fetchall()
        out: dict[str, list[tuple[str, float]]] = {"top": [], "bottom": []}
        for side, token, value in rows:
            out[side].append((token, value))
        return out

    def _neuron_sample_size(self) -> int:
        windows = self.store.manifest.get("sources", {}).get("neuron", {}).get("windows") or {}
        return int(windows.get("sample", neuron_windows.SAMPLE_PER_CHUNK))

    def _acts_in(self, seq_ids: list[int]) -> dict[tuple[int, int], float]:
        if not seq_ids:
            return {}
        if self.source == "neuron":  # true values on the stored window tokens (0.0 elsewhere: not stored)
            rows = self.store.con.execute(neuron_windows.WINDOW_VALUES_SQL, [self.layer, self.feature, seq_ids]).fetchall()
            return {(s, p): a for s, p, a in rows}
        rows = self.store.con.execute(
            f"SELECT seq_id, pos, act FROM {self._scan()} WHERE feature = ? AND seq_id IN (SELECT unnest(?::INTEGER[]))",
            [self.feature, seq_ids]).fetchall()
        return {(s, p): a for s, p, a in rows}

    def _windows(self, rows, before: int, after: int, acts: dict | None = None) -> list[Example]:
        if not rows:
            return []
        seq_ids = sorted({r[0] for r in rows})
        if acts is None:
            acts = self._acts_in(seq_ids)
        con = self.store.con
        wanted = pa.table({"seq_id": pa.array([r[0] for r in rows], pa.int32()),
                           "lo": pa.array([max(0, r[1] - before) for r in rows], pa.int32()),
                           "hi": pa.array([r[1] + after for r in rows], pa.int32())})
        con.register("_wanted_windows", wanted)
        try:
            token_rows = con.execute(
                "SELECT DISTINCT t.seq_id, t.pos, t.token_id, t.token, t.region FROM tokens t "
                "JOIN _wanted_windows w ON t.seq_id = w.seq_id AND t.pos BETWEEN w.lo AND w.hi "
                "ORDER BY t.seq_id, t.pos").fetchall()
            domains = dict(con.execute(
                "SELECT seq_id, domain FROM sequences WHERE seq_id IN (SELECT seq_id FROM _wanted_windows)").fetchall())
        finally:
            con.unregister("_wanted_windows")
        by_seq: dict[int, dict[int, tuple]] = {}
        for seq_id, pos, token_id, token, region in token_rows:
            by_seq.setdefault(seq_id, {})[pos] = (token_id, token, region)
        examples = []
        for seq_id, pos, act in rows:
            tokens = by_seq.get(seq_id, {})
            window = [p for p in range(max(0, pos - before), pos + after + 1) if p in tokens]
            examples.append(Example(
                seq_id=seq_id, pos=pos, act=float(act),
                token_ids=[tokens[p][0] for p in window], tokens=[tokens[p][1] for p in window],
                acts=[float(acts.get((seq_id, p), 0.0)) for p in window],
                train_token_ind=window.index(pos) if pos in tokens else -1,
                domain=domains.get(seq_id, ""), region=tokens[pos][2] if pos in tokens else "",
            ))
        return examples
