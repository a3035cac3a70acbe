"""What the feature browser shows, computed from the store on demand and cached.

The list reads only per-feature tables (the ``features`` view, latest judge results, logit lens), materialized once
into an in-memory catalog, so the first page of any store answers without scanning activations. Per-feature work
(histogram, range-grouped examples, region/domain breakdown) reads one layer's activation files filtered by feature,
which the (feature, seq_id, pos) sort order lets DuckDB prune to a few row groups; results are kept in an LRU cache.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from pathlib import Path

from featurestore.errors import UserError
from featurestore.ids import cantor
from featurestore.text import merge_partial_bytes
from featurestore.views import activation_scan

SORTS = {"layer": "layer, feature", "freq": "activation_freq", "max_act": "max_act", "count": "activation_count",
         "description": "description"}
HIST_BINS = 40
SPARK_BINS = 16
TOP_GROUP = 10  # examples in the top group
N_INTERVALS = 6  # equal-width intervals of the activation range below the top group
PER_INTERVAL = 4
BEFORE, AFTER = 40, 16
MAX_LIMIT = 500


class BrowserData:
    """One store's browser queries on a private DuckDB connection (its own lock: one query at a time)."""

    def __init__(self, store, graphs: Path | None = None, cache_size: int = 256):
        from featurestore.store import Store

        # a Store of our own: a DuckDB connection serves one query at a time, and the viewer's StoreSource and
        # the trace requests use theirs from other threads
        self.store = Store(store.path)
        self.graphs = graphs
        self.con = self.store.con
        self.lock = threading.RLock()
        self._catalog_ready = False
        self._top_tokens_ready = False
        self._raw: dict[int, bytes | None] | None = None
        self._pages: OrderedDict[tuple, dict] = OrderedDict()
        self._spark: dict[tuple, list[int]] = {}
        self._baseline: dict | None = None
        self._graph_index: tuple[tuple, dict] | None = None
        self.cache_size = cache_size

    # ---- the list ----

    def _catalog(self) -> None:
        if self._catalog_ready:
            return
        self.con.execute("""CREATE OR REPLACE TEMP TABLE browser_catalog AS
            WITH d AS (SELECT source, layer, feature, description FROM explanations WHERE status = 'ok'
                       QUALIFY row_number() OVER (PARTITION BY source, layer, feature ORDER BY created_at DESC) = 1),
                 c AS (SELECT source, layer, feature, category FROM classifications WHERE status = 'ok'
                       QUALIFY row_number() OVER (PARTITION BY source, layer, feature ORDER BY created_at DESC) = 1),
                 l AS (SELECT source, layer, feature, list(token ORDER BY rank) AS top_logits FROM logit_lens
                       WHERE side = 'top' GROUP BY ALL)
            SELECT f.source, f.layer, f.feature, f.activation_count, f.activation_freq, f.max_act, f.mean_act,
                   d.description, c.category, l.top_logits,
                   list_transform(coalesce(l.top_logits, []), lambda x: lower(trim(x))) AS logit_keys
            FROM features f LEFT JOIN d USING (source, layer, feature) LEFT JOIN c USING (source, layer, feature)
                 LEFT JOIN l USING (source, layer, feature)""")
        self._catalog_ready = True

    def _top_tokens(self) -> None:
        """The token each feature fires on most: a scan of every activation, so built only when first searched."""
        if self._top_tokens_ready:
            return
        self.con.execute("""CREATE OR REPLACE TEMP TABLE browser_top_token AS
            SELECT a.source, a.layer, a.feature, mode(t.token) AS fires_on
            FROM activations a JOIN tokens t USING (seq_id, pos) GROUP BY ALL""")
        self._top_tokens_ready = True

    def overview(self) -> dict:
        with self.lock:
            self._catalog()
            rows = self.con.execute("SELECT source, layer, count(*) FROM browser_catalog GROUP BY ALL ORDER BY ALL").fetchall()
            categories = [c for (c,) in self.con.execute(
                "SELECT DISTINCT category FROM browser_catalog WHERE category IS NOT NULL ORDER BY 1").fetchall()]
        model = self.store.manifest.get("model", {})
        return {"store": str(self.store.path), "model": model.get("name"), "n_layers": model.get("n_layers"),
                "layers": [{"source": s, "layer": l, "live": n} for s, l, n in rows],
                "sources": sorted({s for s, _, _ in rows}), "categories": categories}

    def list_features(self, params: dict) -> dict:
        where, args = ["source = ?"], [params.get("source") or "transcoder"]
        if params.get("layer") not in (None, ""):
            where.append("layer = ?")
            args.append(_int(params["layer"], "layer"))
        for key, op in (("min_freq", ">="), ("max_freq", "<=")):
            if params.get(key) not in (None, ""):
                where.append(f"activation_freq {op} ?")
                args.append(_float(params[key], key))
        if params.get("category"):
            where.append("category = ?")
            args.append(params["category"])
        if params.get("explained") in ("yes", "no"):
            where.append("description IS " + ("NOT NULL" if params["explained"] == "yes" else "NULL"))
        if params.get("q"):
            where.append("description ILIKE ?")
            args.append("%" + params["q"].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
            where[-1] += " ESCAPE '\\'"
        if params.get("logit"):
            where.append("list_contains(logit_keys, ?)")
            args.append(params["logit"].strip().lower())
        join = ""
        if params.get("token"):
            join = " LEFT JOIN browser_top_token USING (source, layer, feature)"
            where.append("lower(trim(fires_on)) = ?")
            args.append(params["token"].strip().lower())
        sort = SORTS.get(params.get("sort") or "layer")
        if sort is None:
            raise UserError(f"sort must be one of {', '.join(SORTS)}")
        default = "desc" if params.get("sort") in ("freq", "max_act", "count") else "asc"
        direction = "DESC" if (params.get("order") or default) == "desc" else "ASC"
        order = ", ".join(f"{col} {direction} NULLS LAST" for col in sort.split(", ")) + ", layer, feature"
        limit = min(MAX_LIMIT, max(1, _int(params.get("limit") or 50, "limit")))
        offset = max(0, _int(params.get("offset") or 0, "offset"))
        with self.lock:
            self._catalog()
            if join:
                self._top_tokens()
            clause = " AND ".join(where)
            total = self.con.execute(f"SELECT count(*) FROM browser_catalog{join} WHERE {clause}", args).fetchall()[0][0]
            cur = self.con.execute(
                f"SELECT source, layer, feature, activation_count, activation_freq, max_act, mean_act, description, "
                f"category, top_logits FROM browser_catalog{join} WHERE {clause} ORDER BY {order} LIMIT ? OFFSET ?",
                args + [limit, offset])
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for row in rows:
            row["top_logits"] = list(row["top_logits"] or [])[:3]
            row["cantor_id"] = cantor(row["layer"], row["feature"])
        return {"total": total, "offset": offset, "limit": limit, "rows": rows}

    def labels(self, keys: list[tuple[int, int]], source: str = "transcoder") -> dict[tuple[int, int], tuple]:
        """(layer, feature) -> (description or None, activation_freq) for graph node labels."""
        if not keys:
            return {}
        with self.lock:
            self._catalog()
            rows = self.con.execute(
                "SELECT layer, feature, description, activation_freq FROM browser_catalog WHERE source = ? "
                "AND layer::BIGINT * 4294967296 + feature IN (SELECT unnest(?::BIGINT[]))",
                [source, [l * 4294967296 + f for l, f in keys]]).fetchall()
        return {(l, f): (d, q) for l, f, d, q in rows}

    def sparklines(self, source: str, layer: int, features: list[int]) -> dict[int, list[int]]:
        """Per feature, counts of its activations in SPARK_BINS equal-width bins of (0, max_act]."""
        missing = [f for f in features if (source, layer, f) not in self._spark]
        if missing:
            with self.lock:
                self._catalog()
                found = self._histograms(source, layer, missing, SPARK_BINS)
            for f in missing:
                self._spark[(source, layer, f)] = found.get(f, [0] * SPARK_BINS)
        return {f: self._spark[(source, layer, f)] for f in features}

    def _histograms(self, source: str, layer: int, features: list[int], bins: int) -> dict[int, list[int]]:
        if not features:
            return {}
        scan = activation_scan(self.store.manifest_obj, source, layer)
        rows = self.con.execute(
            f"""SELECT a.feature, least(floor(a.act / m.max_act * {bins}), {bins - 1})::INTEGER AS bin, count(*)
                FROM {scan} a JOIN (SELECT feature, max_act FROM browser_catalog WHERE source = ? AND layer = ?) m
                USING (feature)
                WHERE a.feature BETWEEN ? AND ? AND a.feature IN (SELECT unnest(?::INTEGER[])) GROUP BY ALL""",
            [source, layer, min(features), max(features), features]).fetchall()
        out: dict[int, list[int]] = {}
        for feature, b, n in rows:
            out.setdefault(feature, [0] * bins)[max(0, b)] += n
        return out

    # ---- a feature page ----

    def feature_page(self, source: str, layer: int, feature: int) -> dict:
        key = (source, layer, feature)
        with self.lock:
            if key in self._pages:
                self._pages.move_to_end(key)
                return self._pages[key]
            page = self._feature_page(source, layer, feature)
            self._pages[key] = page
            if len(self._pages) > self.cache_size:
                self._pages.popitem(last=False)
            return page

    def _feature_page(self, source: str, layer: int, feature: int) -> dict:
        self._catalog()
        cur = self.con.execute("SELECT activation_count, activation_freq, max_act, mean_act, description, category "
                               "FROM browser_catalog WHERE source = ? AND layer = ? AND feature = ?", [source, layer, feature])
        found = cur.fetchall()
        page = {"source": source, "layer": layer, "feature": feature, "cantor_id": cantor(layer, feature),
                "graphs": self.graphs_with(cantor(layer, feature)) if source == "transcoder" else []}
        handle = self.store.feature(layer, feature, source)
        page["logit_lens"] = {side: [{"token": t, "value": v} for t, v in values]
                              for side, values in handle.logit_lens().items()}
        page["interp"] = self._interp(source, layer, feature)
        if not found:
            return page | {"dead": True, "stats": None}
        stats = dict(zip(("activation_count", "activation_freq", "max_act", "mean_act", "description", "category"), found[0]))
        page |= {"dead": False, "stats": stats}
        max_act = float(stats["max_act"])
        hist = self._histograms(source, layer, [feature], HIST_BINS).get(feature, [0] * HIST_BINS)
        page["histogram"] = {"counts": hist, "edges": [max_act * i / HIST_BINS for i in range(HIST_BINS + 1)]}
        page["groups"] = self._groups(handle, source, layer, feature, max_act)
        page["breakdown"] = self._breakdown(source, layer, feature)
        if source == "neuron":
            page["note"] = ("neurons keep only their top positions per sequence: the statistics count every positive "
                            "activation, the histogram, examples and breakdowns only the stored ones")
        return page

    def _groups(self, handle, source: str, layer: int, feature: int, max_act: float) -> list[dict]:
        """SAEDashboard-style: the top activations, then equal-width intervals of (0, max_act], highest first,
        each a seeded sample (without the top group's examples)."""
        scan = activation_scan(self.store.manifest_obj, source, layer)
        top = self.con.execute(f"SELECT seq_id, pos, act FROM {scan} WHERE feature = ? ORDER BY act DESC, seq_id, pos "
                               f"LIMIT {TOP_GROUP}", [feature]).fetchall()
        taken = {(s, p) for s, p, _ in top}
        sampled = self.con.execute(
            f"""SELECT bucket, seq_id, pos, act FROM (
                  SELECT seq_id, pos, act, least(floor(act / ? * {N_INTERVALS}), {N_INTERVALS - 1})::INTEGER AS bucket
                  FROM {scan} WHERE feature = ? AND act > 0)
                QUALIFY row_number() OVER (PARTITION BY bucket ORDER BY hash(seq_id, pos, {feature}, 0::BIGINT), seq_id, pos)
                        <= {PER_INTERVAL + TOP_GROUP}
                ORDER BY bucket DESC, act DESC""", [max_act, feature]).fetchall()
        counts = dict(self.con.execute(
            f"SELECT least(floor(act / ? * {N_INTERVALS}), {N_INTERVALS - 1})::INTEGER, count(*) FROM {scan} "
            "WHERE feature = ? AND act > 0 GROUP BY 1", [max_act, feature]).fetchall())
        groups = [{"label": "Top activations", "kind": "top", "lo": top[-1][2] if top else 0.0, "hi": max_act,
                   "count": len(top), "pairs": [(s, p) for s, p, _ in top]}]
        for bucket in range(N_INTERVALS - 1, -1, -1):
            pairs = [(s, p) for b, s, p, _ in sampled if b == bucket and (s, p) not in taken][:PER_INTERVAL]
            lo, hi = max_act * bucket / N_INTERVALS, max_act * (bucket + 1) / N_INTERVALS
            groups.append({"label": f"Interval {lo:.3g} – {hi:.3g}", "kind": "interval", "lo": lo, "hi": hi,
                           "count": int(counts.get(bucket, 0)), "pairs": pairs})
        wanted = [pair for g in groups for pair in g["pairs"]]
        examples = {(e.seq_id, e.pos): e for e in handle.examples_at(wanted, BEFORE, AFTER)}
        thinking = self._thinking_positions(wanted)
        raw = self._raw_bytes()
        for group in groups:
            group["examples"] = [self._example(examples[pair], raw, thinking.get(pair)) for pair in group.pop("pairs")
                                 if pair in examples]
        return groups

    def _example(self, example, raw, thinking_pos) -> dict:
        texts = merge_partial_bytes([raw.get(t) for t in example.token_ids], example.tokens)
        return {"seq_id": example.seq_id, "pos": example.pos, "act": example.act, "domain": example.domain,
                "region": example.region, "thinking_pos": thinking_pos, "text": texts, "acts": example.acts,
                "index": example.train_token_ind}

    def _thinking_positions(self, pairs: list[tuple[int, int]]) -> dict:
        if not pairs:
            return {}
        rows = self.con.execute(
            "SELECT seq_id, pos, thinking_pos FROM tokens WHERE seq_id IN (SELECT unnest(?::INTEGER[])) "
            "AND seq_id::BIGINT * 4294967296 + pos IN (SELECT unnest(?::BIGINT[]))",
            [sorted({s for s, _ in pairs}), [s * 4294967296 + p for s, p in pairs]]).fetchall()
        return {(s, p): (None if t is None or t != t else float(t)) for s, p, t in rows}

    def _raw_bytes(self) -> dict[int, bytes | None]:
        if self._raw is None:
            self._raw = dict(self.con.execute("SELECT token_id, raw FROM vocab").fetchall())
        return self._raw

    def _breakdown(self, source: str, layer: int, feature: int) -> dict:
        """Share of this feature's activations per region and domain, against the share of all tokens."""
        scan = activation_scan(self.store.manifest_obj, source, layer)
        regions = dict(self.con.execute(
            f"SELECT t.region, count(*) FROM {scan} a JOIN tokens t USING (seq_id, pos) WHERE a.feature = ? GROUP BY 1",
            [feature]).fetchall())
        domains = dict(self.con.execute(
            f"SELECT s.domain, count(*) FROM {scan} a JOIN sequences s USING (seq_id) WHERE a.feature = ? GROUP BY 1",
            [feature]).fetchall())
        base = self._baseline_counts()
        return {"region": _shares(regions, base["region"]), "domain": _shares(domains, base["domain"])}

    def _baseline_counts(self) -> dict:
        if self._baseline is None:
            self._baseline = {
                "region": dict(self.con.execute("SELECT region, count(*) FROM tokens GROUP BY 1").fetchall()),
                "domain": dict(self.con.execute("SELECT domain, sum(n_tokens) FROM sequences GROUP BY 1").fetchall())}
        return self._baseline

    def _interp(self, source: str, layer: int, feature: int) -> dict:
        out = {}
        for view, columns in (("explanations", "run_id, description, n_examples, judge_model, created_at"),
                              ("classifications", "run_id, category, confidence, domain_type, mechanism, "
                                                  "category_description, judge_model, created_at"),
                              ("detection_scores", "run_id, condition, control, n_positives, n_negatives, accuracy, "
                                                   "balanced_accuracy, precision, recall, f1, created_at")):
            cur = self.con.execute(f"SELECT {columns} FROM {view} WHERE status = 'ok' AND source = ? AND layer = ? "
                                   "AND feature = ? ORDER BY created_at DESC", [source, layer, feature])
            names = [d[0] for d in cur.description]
            out[view] = [{k: (str(v) if k == "created_at" else v) for k, v in zip(names, row)} for row in cur.fetchall()]
        return out

    # ---- graphs that contain a feature ----

    def graphs_with(self, cantor_id: int) -> list[dict]:
        return self._graphs().get(cantor_id, [])

    def _graphs(self) -> dict[int, list[dict]]:
        """cantor id -> [{slug, node_id}] over the graph files in --graphs, rebuilt when a file changes."""
        if self.graphs is None:
            return {}
        files = sorted(p for p in self.graphs.glob("*.json") if p.name != "graph-metadata.json")
        stamp = tuple((p.name, p.stat().st_mtime_ns) for p in files)
        if self._graph_index is not None and self._graph_index[0] == stamp:
            return self._graph_index[1]
        index: dict[int, list[dict]] = {}
        for path in files:
            try:
                document = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            slug = path.stem
            seen = set()
            for node in document.get("nodes", []) if isinstance(document, dict) else []:
                if node.get("feature_type") != "cross layer transcoder" or not isinstance(node.get("feature"), int):
                    continue
                if (node["feature"], slug) in seen:
                    continue
                seen.add((node["feature"], slug))
                index.setdefault(node["feature"], []).append({"slug": slug, "node_id": node.get("node_id")})
        self._graph_index = (stamp, index)
        return index


def _shares(counts: dict, baseline: dict) -> list[dict]:
    total, base_total = sum(counts.values()) or 1, sum(baseline.values()) or 1
    keys = sorted(set(counts) | set(baseline), key=lambda k: -counts.get(k, 0))
    return [{"name": k, "count": int(counts.get(k, 0)), "share": counts.get(k, 0) / total,
             "baseline": float(baseline.get(k, 0)) / base_total} for k in keys if k is not None]


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be an integer") from None


def _float(value, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a number") from None
