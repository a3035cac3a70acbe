"""A handle on one feature: its statistics, examples with context windows, and logit lens."""
from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from . import neuron_windows, views
from .errors import UserError
from .ids import cantor
from .text import merge_partial_bytes
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
    raws: list[bytes | None] | None = field(default=None, repr=False)  # each token's bytes (vocab.raw), for merging

    def display_tokens(self) -> list[str]:
        """One readable string per token: a character split across byte-level tokens shows on the token that
        completes it (``tokens`` keeps the vocab's raw ``\\xNN`` form)."""
        return merge_partial_bytes(self.raws or [None] * len(self.tokens), self.tokens)

    @property
    def text(self) -> str:
        """The window as one readable string."""
        return "".join(self.display_tokens())

    def __str__(self) -> str:
        shown = self.display_tokens()
        i = self.train_token_ind
        body = "".join(shown) if not 0 <= i < len(shown) else \
            "".join(shown[:i]) + "[[" + shown[i] + "]]" + "".join(shown[i + 1:])
        return f"seq {self.seq_id} pos {self.pos} act {self.act:.4g} ({self.domain}/{self.region}): {body}"

    def _repr_html_(self) -> str:
        """Notebook form: each token shaded by this feature's activation, the activating token outlined."""
        peak = max((a for a in self.acts if a > 0), default=0.0) or 1.0
        spans = []
        for i, (text, act) in enumerate(zip(self.display_tokens(), self.acts)):
            alpha = max(0.0, min(1.0, act / peak))
            style = f"background:rgba(255,140,0,{alpha:.3f});white-space:pre-wrap"
            if i == self.train_token_ind:
                style += ";outline:2px solid #c00;font-weight:bold"
            spans.append(f'<span style="{style}" title="{act:.4g}">{html.escape(text)}</span>')
        head = html.escape(f"seq {self.seq_id} pos {self.pos} act {self.act:.4g} ({self.domain}/{self.region})")
        return f'<div style="font-family:monospace"><div style="color:#666">{head}</div>{"".join(spans)}</div>'


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    out, values = [], sorted(values)
    start = prev = None
    for v in values + [None]:
        if start is not None and v == prev + 1:
            prev = v
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = v
    return ", ".join(out) or "none"


def check_unit(manifest: dict, source: str, layer: int, feature: int) -> None:
    """One-line UserError naming the valid range for a source, layer or feature the store does not hold."""
    sources = manifest.get("sources", {})
    if source not in sources:
        have = ", ".join(sorted(sources)) or "none"
        raise UserError(f"this store has no {source} activations (sources: {have}); "
                        f"collect them with `featurestore collect --source {source}`")
    model = manifest["model"]
    layers = list(sources[source].get("layers") or range(int(model["n_layers"])))
    if layer not in layers:
        raise UserError(f"layer {layer} out of range: this store holds {source} layers {_ranges(layers)}")
    if source == "neuron":
        sampled = (sources[source].get("neurons") or {}).get(str(layer))
        if sampled is not None and feature not in sampled:
            raise UserError(f"neuron {feature} of layer {layer} was not sampled: layer {layer} holds "
                            f"{len(sampled)} of neurons 0-{int(model['d_mlp']) - 1} (the neuron view lists them)")
        return
    n_units = int(model["n_features"])
    if not 0 <= feature < n_units:
        raise UserError(f"feature {feature} out of range: layer {layer} has features 0-{n_units - 1}")


def _window_rows(manifest, seq_ids: list[int], wanted: pa.Table) -> pa.Table:
    """The tokens inside the wanted windows: their sequences' row groups only (not a scan of every token), cut to
    the windows in numpy so the join that follows sees a few thousand rows."""
    table = views.sequence_tokens(manifest, seq_ids, ["seq_id", "pos", "token_id", "region"])
    key = (table.column("seq_id").to_numpy().astype(np.int64) << 32) | table.column("pos").to_numpy().astype(np.int64)
    seq = wanted.column("seq_id").to_numpy().astype(np.int64) << 32
    first = np.searchsorted(key, seq | wanted.column("lo").to_numpy().astype(np.int64))
    stop = np.searchsorted(key, seq | wanted.column("hi").to_numpy().astype(np.int64), side="right")
    rows = np.unique(np.concatenate([np.arange(a, b) for a, b in zip(first.tolist(), stop.tolist())] or [np.zeros(0, np.int64)]))
    return table.take(rows)


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

    def stats(self) -> dict:
        """Counts, frequency, max and mean activation, and ``dead`` (True, with zero counts, if it never fired)."""
        rows = self.store.con.execute(
            "SELECT activation_count, activation_freq, max_act, mean_act FROM features "
            "WHERE source = ? AND layer = ? AND feature = ?", [self.source, self.layer, self.feature]).fetchall()
        if not rows:
            return {"activation_count": 0, "activation_freq": 0.0, "max_act": 0.0, "mean_act": 0.0, "dead": True}
        return dict(zip(("activation_count", "activation_freq", "max_act", "mean_act"), rows[0])) | {"dead": False}

    def top_examples(self, k: int = 20, before: int = CONTEXT_BEFORE, after: int = CONTEXT_AFTER,
                     max_per_sequence: int | None = 2) -> list[Example]:
        """The k highest activations, at most ``max_per_sequence`` from any one sequence (the exports' default, so
        one long trace cannot fill the list; None: no cap, as the original). Ties go by (seq_id, pos)."""
        if self.source == "neuron":  # the store-wide top k, with true-activation windows
            return self._windows(self.store.con.execute(neuron_windows.top_rows_sql(k), [self.layer, self.feature]).fetchall(),
                                 before, after)
        if max_per_sequence is not None and max_per_sequence < 1:
            raise UserError("max_per_sequence must be at least 1 (or None for no cap)")
        ranked = f"SELECT seq_id, pos, act FROM {self._scan()} WHERE feature = ?"
        if max_per_sequence is not None:
            ranked = (f"SELECT seq_id, pos, act FROM ({ranked}) QUALIFY row_number() OVER "
                      f"(PARTITION BY seq_id ORDER BY act DESC, pos) <= {int(max_per_sequence)}")
        rows = self.store.con.execute(f"{ranked} ORDER BY act DESC, seq_id, pos LIMIT ?", [self.feature, k]).fetchall()
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
        con.register("_window_tokens", _window_rows(self.store.manifest_obj, seq_ids, wanted))
        try:
            token_rows = con.execute(
                "SELECT DISTINCT t.seq_id, t.pos, t.token_id, v.token, t.region::VARCHAR, v.raw FROM _window_tokens t "
                "JOIN _wanted_windows w ON t.seq_id = w.seq_id AND t.pos BETWEEN w.lo AND w.hi "
                "LEFT JOIN vocab v ON v.token_id = t.token_id ORDER BY t.seq_id, t.pos").fetchall()
            domains = dict(con.execute(
                "SELECT seq_id, domain FROM sequences WHERE seq_id IN (SELECT seq_id FROM _wanted_windows)").fetchall())
        finally:
            con.unregister("_wanted_windows")
            con.unregister("_window_tokens")
        by_seq: dict[int, dict[int, tuple]] = {}
        for seq_id, pos, token_id, token, region, raw in token_rows:
            by_seq.setdefault(seq_id, {})[pos] = (token_id, token, region, raw)
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
                raws=[tokens[p][3] for p in window],
            ))
        return examples
