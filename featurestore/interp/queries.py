"""Reading judge results back: descriptions for node labels, and decoded requests for audit and re-scoring."""
from __future__ import annotations

import json

import polars as pl

from .tables import decompress_text


def descriptions(store, source: str = "transcoder", run_id: str | None = None) -> pl.DataFrame:
    """(layer, feature, description): per feature, the latest successful auto-interp description.

    With ``run_id``, only that run's. Attribution graphs use these as node labels.
    """
    where = "status = 'ok' AND source = ?" + (" AND run_id = ?" if run_id else "")
    params = [source] + ([run_id] if run_id else [])
    return store.con.sql(
        f"SELECT layer, feature, description FROM explanations WHERE {where} "
        "QUALIFY row_number() OVER (PARTITION BY layer, feature ORDER BY created_at DESC) = 1 "
        "ORDER BY layer, feature", params=params).pl()


def requests(store, run_id: str, layer: int | None = None, feature: int | None = None) -> list[dict]:
    """Every HTTP request of a run (optionally one feature's) with the sent body and raw response decoded."""
    where, params = ["run_id = ?"], [run_id]
    if layer is not None:
        where.append("layer = ?")
        params.append(layer)
    if feature is not None:
        where.append("feature = ?")
        params.append(feature)
    rel = store.con.execute(f"SELECT * FROM interp_requests WHERE {' AND '.join(where)} "
                            "ORDER BY layer, feature, purpose, attempt", params)
    names = [d[0] for d in rel.description]
    out = []
    for values in rel.fetchall():
        row = dict(zip(names, values))
        row["request"] = json.loads(decompress_text(row.pop("request_zstd")))
        row["response"] = decompress_text(row.pop("response_zstd"))
        out.append(row)
    return out
