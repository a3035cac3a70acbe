"""The Python API over a store directory: DuckDB views, SQL, per-feature handles, store info."""
from __future__ import annotations

import os

import duckdb

from . import checks, readonly, views
from .errors import UserError
from .features import Feature, check_unit
from .manifest import Manifest
from .storage import store_path


class Store:
    def __init__(self, path: str | os.PathLike, progress: bool = True):
        self.path = store_path(path)
        self.manifest_obj = Manifest.load(self.path)
        checks.quick_check(self.manifest_obj, progress)
        self._con: duckdb.DuckDBPyConnection | None = None  # made on first use: `featurestore sql` never needs it
        self._token_texts: list[str] | None = None
        self._reader: duckdb.DuckDBPyConnection | None = None  # Store.sql's own locked connection, made on first use
        self._verified: set[str] = set()  # files this handle re-hashed (an export verifies once, not per call)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The library's own connection with every view (exports and the API read through it)."""
        if self._con is None:
            self._con = views.connect(self.manifest_obj)
        return self._con

    @property
    def manifest(self) -> dict:
        return self.manifest_obj.data

    def refresh(self) -> "Store":
        """Re-read the manifest (e.g. after another process committed chunks) and redefine the views."""
        self.manifest_obj = Manifest.load(self.path)
        checks.quick_check(self.manifest_obj)
        self._verified = set()
        if self._con is not None:
            views.register(self._con, self.manifest_obj)
        if self._reader is not None:
            views.register(self._reader, self.manifest_obj)
        return self

    def verify(self, source: str | None = None, layers: list[int] | None = None, progress: bool = True) -> None:
        """Re-hash the files an export of (source, layers) reads: vocab, tokens, sequences and the layers'
        activations, feature_stats and logit lens; a mismatch raises ``UserError`` naming the file."""
        m = self.manifest_obj
        rels = ([m.data["vocab"]] if m.data.get("vocab") else []) + m.files("tokens") + m.files("sequences")
        for table in ("activations", "feature_stats", "logit_lens"):
            for rel in m.files(table, source):
                if layers is None or any(f"/layer={layer}/" in rel for layer in layers):
                    rels.append(rel)
        rels = [rel for rel in dict.fromkeys(rels) if rel not in self._verified]
        checks.verify_files(m, rels, progress)
        self._verified.update(rels)

    def sql(self, query: str, params=None) -> duckdb.DuckDBPyRelation:
        """Run a read-only query over the store's views (and any local file it names); statements that could write,
        attach, install or reconfigure are refused with a ``UserError`` (see ``featurestore.readonly``)."""
        if self._reader is None:
            self._reader = readonly.lock(views.connect(self.manifest_obj))
        readonly.check_read_only(query, self._reader)
        try:
            return self._reader.sql(query, params=params)
        except duckdb.Error as exc:
            raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None

    def token_texts(self) -> list[str]:
        """Display text of every token id (partial UTF-8 bytes as ``\\xNN``), loaded once."""
        if self._token_texts is None:
            rows = self.con.execute("SELECT token_id, token FROM vocab ORDER BY token_id").fetchall()
            texts = [""] * (rows[-1][0] + 1 if rows else 0)
            for token_id, text in rows:
                texts[token_id] = text
            self._token_texts = texts
        return self._token_texts

    def feature(self, layer: int, feature: int, source: str = "transcoder") -> Feature:
        """A handle on one unit; UserError (with the valid range) for a source, layer or feature not held."""
        check_unit(self.manifest, source, int(layer), int(feature))
        return Feature(self, int(layer), int(feature), source)

    def features(self, source: str | None = None):
        """Per-feature statistics of live features as a polars DataFrame."""
        where = "" if source is None else f"WHERE source = '{source}'"
        return self.con.sql(f"SELECT * FROM features {where} ORDER BY source, layer, feature").pl()

    def descriptions(self, source: str = "transcoder", run_id: str | None = None):
        """(layer, feature, description) from the latest successful auto-interp, as a polars DataFrame."""
        from .interp.queries import descriptions
        return descriptions(self, source, run_id)

    def trace(self, text: str, model, **options):
        """Which features fire on ``text`` (formatted like the store's data): see ``featurestore.tracing.trace``."""
        from .tracing import trace

        return trace(text, model, self, **options)

    def steer(self, text: str, model, edits, **options):
        """The model with and without ``edits`` ("3/17=0", "3=off") on ``text``: see ``featurestore.intervention``."""
        from .intervention import steer_text

        return steer_text(text, model, edits, self, **options)

    def info(self) -> dict:
        m = self.manifest
        counts = dict(self.con.execute(
            "SELECT source, count(*) FROM activations GROUP BY source ORDER BY source").fetchall())
        live = dict(self.con.execute("SELECT source, count(*) FROM features GROUP BY source").fetchall())
        seqs, toks = self.con.execute("SELECT count(*), coalesce(sum(n_tokens), 0) FROM sequences").fetchall()[0]
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path),
            "model": {k: m["model"].get(k) for k in ("name", "n_layers", "n_features", "d_model", "d_mlp", "vocab_size")},
            "data": m["data"],
            "settings": m["settings"],
            "sources": {s: {"layers": v.get("layers"), "activations": counts.get(s, 0), "live_features": live.get(s, 0),
                            "chunks": len(self.manifest_obj.committed(s))} for s, v in m["sources"].items()},
            "sequences": seqs,
            "tokens": int(toks),
            "bytes_on_disk": size,
            "runs": m["runs"],
            "interp_runs": self._interp_runs(),
            "graphs": self._graphs(),
        }

    def _interp_runs(self) -> list[dict]:
        """One entry per judge run (a resumed run is one run): what it labelled and how it went."""
        runs = self.con.execute("""SELECT run_id, kind, judge_model, started_at::VARCHAR, invocations FROM interp_runs
                                   ORDER BY started_at, run_id""").fetchall()
        outcomes: dict[str, dict[str, int]] = {}
        for table in ("classifications", "explanations"):
            for run_id, status, n in self.con.execute(
                    f"SELECT run_id, status, count(*) FROM {table} GROUP BY ALL").fetchall():
                outcomes.setdefault(run_id, {})[status] = outcomes.get(run_id, {}).get(status, 0) + n
        return [{"run_id": run_id, "kind": kind, "judge_model": model, "started": started, "invocations": n,
                 "features": outcomes.get(run_id, {})} for run_id, kind, model, started, n in runs]

    def _graphs(self) -> dict:
        rows = self.con.execute("SELECT slug, n_nodes, n_links FROM graphs ORDER BY slug").fetchall()
        return {"count": len(rows), "graphs": [{"slug": s, "nodes": n, "links": k} for s, n, k in rows]}


def open(path: str | os.PathLike) -> Store:  # noqa: A001 - mirrors the package-level API featurestore.open
    return Store(path)
