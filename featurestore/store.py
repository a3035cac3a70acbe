"""The Python API over a store directory: DuckDB views, SQL, per-feature handles, store info."""
from __future__ import annotations

import os

import duckdb

from . import views
from .errors import UserError
from .features import Feature
from .manifest import Manifest
from .storage import store_path


class Store:
    def __init__(self, path: str | os.PathLike):
        self.path = store_path(path)
        self.manifest_obj = Manifest.load(self.path)
        self.con = duckdb.connect()
        views.register(self.con, self.manifest_obj)
        self._token_texts: list[str] | None = None

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @property
    def manifest(self) -> dict:
        return self.manifest_obj.data

    def refresh(self) -> "Store":
        """Re-read the manifest (e.g. after another process committed chunks) and redefine the views."""
        self.manifest_obj = Manifest.load(self.path)
        views.register(self.con, self.manifest_obj)
        return self

    def sql(self, query: str, params=None) -> duckdb.DuckDBPyRelation:
        try:
            return self.con.sql(query, params=params)
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
        }


def open(path: str | os.PathLike) -> Store:  # noqa: A001 - mirrors the package-level API featurestore.open
    return Store(path)
