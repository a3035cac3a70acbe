"""``feature_metadata.json`` in the original schema: token totals and per-feature domain / region / thinking-position
densities and fractions, computed with one grouped join per layer.

Definitions (as the original): ``*_density[k] = activations in k / tokens in k``, ``*_fraction[k] = activations in k /
all activations of the feature``; the thinking fraction divides by the feature's activations that have a thinking
position (the original only kept complete traces, where that is every thinking-region activation). Dicts carry only
keys with non-zero counts; the thinking lists always have 10 bins. Denominators count the sequences this source
was collected over.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from featurestore import schema, views
from featurestore.ids import cantor
from featurestore.storage import write_bytes_atomic

from .feature_queries import source_total_tokens, tokens_scan
from .staging import ensure_writable_parent, remove_if_empty

N_BINS = 10
BIN_SQL = f"CASE WHEN thinking_pos IS NOT NULL THEN least({N_BINS - 1}, floor(thinking_pos * {N_BINS}))::INTEGER END"


def source_sequence_filter(store, source: str, column: str = "seq_id") -> str:
    """A predicate on ``column`` (a seq_id) selecting the sequences of the chunks committed for ``source``."""
    records = [c for c in store.manifest["chunks"] if c["source"] == source]
    all_rows = {tuple(c["rows"]) for c in store.manifest["chunks"]}
    mine = sorted({tuple(c["rows"]) for c in records})
    if set(mine) == all_rows:
        return "true"
    merged: list[list[int]] = []
    for start, stop in mine:
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return "(" + " OR ".join(f"({column} >= {a} AND {column} < {b})" for a, b in merged) + ")" if merged else "false"


def _token_totals(con, store, keep: str) -> tuple[dict, dict, list[int]]:
    tokens = f"(SELECT * FROM {tokens_scan(store)} WHERE {keep})"
    per_domain = dict(con.execute(f"SELECT domain, sum(n_tokens)::BIGINT FROM sequences WHERE {keep} "
                                  "GROUP BY domain ORDER BY domain").fetchall())
    per_region = dict(con.execute(f"SELECT region::VARCHAR, count(*) FROM {tokens} t GROUP BY 1").fetchall())
    per_region = {name: per_region[name] for name in schema.REGIONS if per_region.get(name)}
    bins = [0] * N_BINS
    for b, n in con.execute(f"SELECT {BIN_SQL} AS b, count(*) FROM {tokens} t WHERE thinking_pos IS NOT NULL GROUP BY b").fetchall():
        bins[b] = n
    return per_domain, per_region, bins


_ALL, _BY_DOMAIN, _BY_REGION, _BY_BIN = 7, 3, 5, 6  # grouping(domain, region, bin): a set bit = rolled up


def _layer_counts(con, store, source: str, layer: int, keep: str):
    """(feature, grouping id, key, count) rows: totals and counts by domain, region and thinking bin, in one join."""
    scan = views.activation_scan(store.manifest_obj, source, layer)
    bin_sql = BIN_SQL.replace("thinking_pos", "t.thinking_pos")
    return con.execute(f"""
        SELECT a.feature, grouping(s.domain, t.region, {bin_sql}) AS gid, s.domain, t.region::VARCHAR, {bin_sql}, count(*)
        FROM {scan} a
        JOIN {tokens_scan(store)} t ON t.seq_id = a.seq_id AND t.pos = a.pos
        JOIN sequences s ON s.seq_id = a.seq_id
        WHERE {keep}
        GROUP BY GROUPING SETS ((a.feature), (a.feature, s.domain), (a.feature, t.region), (a.feature, {bin_sql}))
        ORDER BY a.feature""").fetchall()


def _feature_rows(rows, layer: int, totals, is_neuron: bool) -> list[dict]:
    total_tokens, per_domain, per_region, bins = totals
    by_feature: dict[int, dict] = {}
    for feature, gid, domain, region, bin_, n in rows:
        entry = by_feature.setdefault(feature, {"count": 0, "domain": {}, "region": {}, "bins": [0] * N_BINS})
        if gid == _ALL:
            entry["count"] = n
        elif gid == _BY_DOMAIN:
            entry["domain"][domain] = n
        elif gid == _BY_REGION:
            entry["region"][region] = n
        elif gid == _BY_BIN and bin_ is not None:  # the null bin holds activations without a thinking position
            entry["bins"][bin_] = n
    out = []
    for feature in sorted(by_feature):
        entry = by_feature[feature]
        count = entry["count"]
        domains = {d: entry["domain"][d] for d in sorted(entry["domain"]) if entry["domain"][d]}
        regions = {r: entry["region"][r] for r in schema.REGIONS if entry["region"].get(r)}
        thinking = sum(entry["bins"])
        row = {
            "layer": layer, "feature": feature, "cantor_id": cantor(layer, feature),
            "activation_count": count, "activation_freq": count / total_tokens,
            "domain_density": {d: n / per_domain[d] for d, n in domains.items()},
            "domain_fraction": {d: n / count for d, n in domains.items()},
            "region_density": {r: n / per_region[r] for r, n in regions.items()},
            "region_fraction": {r: n / count for r, n in regions.items()},
            "thinking_position_density": [n / bins[b] if bins[b] else 0.0 for b, n in enumerate(entry["bins"])],
            "thinking_position_fraction": [n / thinking if thinking else 0.0 for n in entry["bins"]],
        }
        if is_neuron:
            row["is_neuron"] = True
        out.append(row)
    return out


def feature_metadata(store, source: str = "transcoder", layers: list[int] | None = None) -> dict:
    """The whole ``feature_metadata.json`` document."""
    from .feature_json import check_source

    layers = check_source(store, source, layers)
    keep = source_sequence_filter(store, source)
    con = store.con.cursor()
    try:
        per_domain, per_region, bins = _token_totals(con, store, keep)
        total = source_total_tokens(store, source)
        document: dict = {"total_tokens": total, "tokens_per_domain": per_domain, "tokens_per_region": per_region,
                          "tokens_per_thinking_bin": bins, "features": []}
        if source == "neuron":
            document["is_neuron_baseline"] = True
        for layer in layers:
            rows = _layer_counts(con, store, source, layer, source_sequence_filter(store, source, "a.seq_id"))
            document["features"].extend(_feature_rows(rows, layer, (total, per_domain, per_region, bins), source == "neuron"))
    finally:
        con.close()
    return document


def export_metadata(store, out_dir: str | os.PathLike, *, source: str = "transcoder", layers: list[int] | None = None) -> Path:
    """Write ``out_dir/feature_metadata.json`` atomically; returns its path."""
    path = Path(out_dir) / "feature_metadata.json"
    document = feature_metadata(store, source, layers)
    created = ensure_writable_parent(path)
    data = json.dumps(document, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    from featurestore.errors import UserError

    try:
        return write_bytes_atomic(path, data)
    except OSError as exc:
        remove_if_empty(created)  # a failed export leaves no empty folder behind
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
