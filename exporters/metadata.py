"""``feature_metadata.json`` in the original schema: token totals and per-feature domain / region / thinking-position
densities and fractions: the tokens' region and thinking bin are loaded once, then each layer is one streamed scan
counted with array lookups (no join per layer; memory flat in the store size).

Definitions (as the original): ``*_density[k] = activations in k / tokens in k``, ``*_fraction[k] = activations in k /
all activations of the feature``; the thinking fraction divides by the feature's activations that have a thinking
position (the original only kept complete traces, where that is every thinking-region activation). Dicts carry only
keys with non-zero counts; the thinking lists always have 10 bins. Denominators count the sequences this source
was collected over. Neurons: every count is exact (``featurestore.neuron_counts``, counted over all tokens, as the
``features`` view); the original's approximation (its stored per-sequence top-20 rows) is kept as
``original_approx_activation_count`` / ``original_approx_activation_freq``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

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


class TokenAttributes:
    """Region code and thinking bin of every kept token, in flat (seq_id, pos) arrays: loaded with one scan of
    ``tokens`` per export (2 bytes per token), so each layer's counts need no join, only array lookups."""

    def __init__(self, con, store, keep: str):
        columns = con.execute(f"""SELECT seq_id, pos, coalesce(list_position({views.sql_list(list(schema.REGIONS))},
                                         region::VARCHAR), 0)::TINYINT - 1 AS region, coalesce({BIN_SQL}, -1) AS bin
                                  FROM {tokens_scan(store)} WHERE {keep}""").fetchnumpy()
        seq, pos = np.asarray(columns["seq_id"], dtype=np.int64), np.asarray(columns["pos"], dtype=np.int64)
        size = int(seq.max()) + 1 if len(seq) else 0
        self.seq_len = np.bincount(seq, minlength=size).astype(np.int64)
        self.seq_start = np.cumsum(self.seq_len) - self.seq_len
        flat = self.seq_start[seq] + pos
        self.region = np.full(len(flat), -1, dtype=np.int8)
        self.region[flat] = np.asarray(columns["region"], dtype=np.int8)
        self.bin = np.full(len(flat), -1, dtype=np.int8)
        self.bin[flat] = np.asarray(columns["bin"], dtype=np.int8)
        domains = con.execute(f"SELECT seq_id, domain FROM sequences WHERE {keep}").fetchall()
        self.domain_names = sorted({d for _, d in domains}, key=lambda d: (d is None, d or ""))
        codes = {d: i for i, d in enumerate(self.domain_names)}
        self.domain = np.full(max(size, max((q for q, _ in domains), default=-1) + 1), -1, dtype=np.int16)
        for seq_id, name in domains:
            self.domain[seq_id] = codes[name]

    def totals(self) -> tuple[dict, list[int]]:
        """(tokens per region, tokens per thinking bin), as the original counts them."""
        per_region = np.bincount(self.region[self.region >= 0], minlength=len(schema.REGIONS))
        bins = np.bincount(self.bin[self.bin >= 0], minlength=N_BINS)
        return ({name: int(per_region[i]) for i, name in enumerate(schema.REGIONS) if per_region[i]},
                [int(n) for n in bins[:N_BINS]])


def _token_totals(con, store, keep: str) -> tuple[dict, dict, list[int], TokenAttributes]:
    per_domain = dict(con.execute(f"SELECT domain, sum(n_tokens)::BIGINT FROM sequences WHERE {keep} "
                                  "GROUP BY domain ORDER BY domain").fetchall())
    attributes = TokenAttributes(con, store, keep)
    per_region, bins = attributes.totals()
    return per_domain, per_region, bins, attributes


SCAN_BATCH = 4_000_000  # activations per streamed batch: bounds memory at any store size


def _grow(counts: np.ndarray, size: int) -> np.ndarray:
    return counts if len(counts) >= size else np.concatenate([counts, np.zeros(size - len(counts), counts.dtype)])


def _layer_counts(con, store, source: str, layer: int, tokens: TokenAttributes) -> dict:
    """Per feature: total, by domain, by region and by thinking bin, from one streamed scan of the layer (an
    activation counts where its token and sequence are kept, as the join did)."""
    scan = views.activation_scan(store.manifest_obj, source, layer)
    n_domains, n_regions = len(tokens.domain_names), len(schema.REGIONS)
    total = by_domain = by_region = by_bin = np.zeros(0, dtype=np.int64)
    n_seqs = len(tokens.seq_len)
    reader = con.sql(f"SELECT feature, seq_id, pos FROM {scan}").to_arrow_reader(SCAN_BATCH)
    for batch in reader:
        feature = batch.column(0).to_numpy().astype(np.int64)
        seq = batch.column(1).to_numpy().astype(np.int64)
        pos = batch.column(2).to_numpy().astype(np.int64)
        known = (seq < n_seqs) & (seq < len(tokens.domain))
        known[known] &= (pos[known] < tokens.seq_len[seq[known]]) & (tokens.domain[seq[known]] >= 0)
        if not known.all():
            feature, seq, pos = feature[known], seq[known], pos[known]
        if not len(feature):
            continue
        flat = tokens.seq_start[seq] + pos
        size = int(feature.max()) + 1
        total = _grow(total, size)
        total[:size] += np.bincount(feature, minlength=size)
        by_domain = _grow(by_domain, size * n_domains)
        by_domain[:size * n_domains] += np.bincount(feature * n_domains + tokens.domain[seq], minlength=size * n_domains)
        region = tokens.region[flat].astype(np.int64)
        by_region = _grow(by_region, size * n_regions)
        has = region >= 0
        by_region[:size * n_regions] += np.bincount(feature[has] * n_regions + region[has], minlength=size * n_regions)
        bin_ = tokens.bin[flat].astype(np.int64)
        has = bin_ >= 0
        by_bin = _grow(by_bin, size * N_BINS)
        by_bin[:size * N_BINS] += np.bincount(feature[has] * N_BINS + bin_[has], minlength=size * N_BINS)
    size = len(total)
    return {"total": total, "domain": _grow(by_domain, size * n_domains).reshape(size, n_domains),
            "region": _grow(by_region, size * n_regions).reshape(size, n_regions),
            "bin": _grow(by_bin, size * N_BINS).reshape(size, N_BINS), "domain_names": tokens.domain_names}


def _neuron_layer_counts(con, store, layer: int, tokens: TokenAttributes) -> tuple[dict, dict]:
    """Neurons: the same counts as ``_layer_counts`` from the exact per-chunk counts (``neuron_counts``, every token),
    and the original's approximate count per neuron (its stored rows: per sequence the top 20 above 0.01)."""
    files = [str(store.path / f) for f in store.manifest_obj.files("neuron_counts", "neuron")
             if f.startswith(schema.partition_dir("neuron_counts", "neuron", layer) + "/")]
    exact = con.execute("SELECT feature, activation_count FROM features WHERE source = 'neuron' AND layer = ? "
                        "ORDER BY feature", [layer]).fetchall()
    size = max((f for f, _ in exact), default=-1) + 1
    names = tokens.domain_names
    counts = {"total": np.zeros(size, np.int64), "domain": np.zeros((size, len(names)), np.int64),
              "region": np.zeros((size, len(schema.REGIONS)), np.int64), "bin": np.zeros((size, N_BINS), np.int64),
              "domain_names": names}
    for feature, n in exact:
        counts["total"][feature] = n
    domain_index = {d: i for i, d in enumerate(names)}
    region_index = {r: i for i, r in enumerate(schema.REGIONS)}
    if files:
        for feature, kind, key, n in con.execute(f"""SELECT feature, kind, key, sum(n_active)::BIGINT
                FROM read_parquet({views.sql_list(files)}) GROUP BY ALL ORDER BY ALL""").fetchall():
            if feature >= size:
                continue
            if kind == "domain" and key in domain_index:
                counts["domain"][feature, domain_index[key]] = n
            elif kind == "region" and key in region_index:
                counts["region"][feature, region_index[key]] = n
            elif kind == "bin" and key is not None and 0 <= int(key) < N_BINS:
                counts["bin"][feature, int(key)] = n
    scan = views.activation_scan(store.manifest_obj, "neuron", layer)
    approx = dict(con.execute(f"SELECT feature, count(*) FROM {scan} GROUP BY feature").fetchall())
    return counts, approx


def _feature_rows(counts: dict, layer: int, totals, is_neuron: bool, approx: dict | None = None) -> list[dict]:
    total_tokens, per_domain, per_region, bins = totals
    out = []
    for feature in np.flatnonzero(counts["total"]).tolist():
        count = int(counts["total"][feature])
        domain_counts, region_counts = counts["domain"][feature].tolist(), counts["region"][feature].tolist()
        named = sorted((d, n) for d, n in zip(counts["domain_names"], domain_counts) if n)
        domains = {d: n for d, n in named}
        regions = {r: region_counts[i] for i, r in enumerate(schema.REGIONS) if region_counts[i]}
        feature_bins = counts["bin"][feature].tolist()
        thinking = sum(feature_bins)
        row = {
            "layer": layer, "feature": feature, "cantor_id": cantor(layer, feature),
            "activation_count": count, "activation_freq": count / total_tokens,
            "domain_density": {d: n / per_domain[d] for d, n in domains.items()},
            "domain_fraction": {d: n / count for d, n in domains.items()},
            "region_density": {r: n / per_region[r] for r, n in regions.items()},
            "region_fraction": {r: n / count for r, n in regions.items()},
            "thinking_position_density": [n / bins[b] if bins[b] else 0.0 for b, n in enumerate(feature_bins)],
            "thinking_position_fraction": [n / thinking if thinking else 0.0 for n in feature_bins],
        }
        if is_neuron:
            row["is_neuron"] = True
            if approx is not None:  # the original's count: stored rows (per sequence the top 20 above 0.01)
                row["original_approx_activation_count"] = approx.get(feature, 0)
                row["original_approx_activation_freq"] = approx.get(feature, 0) / total_tokens
        out.append(row)
    return out


def feature_metadata(store, source: str = "transcoder", layers: list[int] | None = None) -> dict:
    """The whole ``feature_metadata.json`` document."""
    rows: list[dict] = []
    document = _metadata(store, source, layers, rows.extend)
    document["features"].extend(rows)
    return document


def _metadata(store, source: str, layers: list[int] | None, add_rows) -> dict:
    """The document with an empty ``features`` list; each layer's rows go to ``add_rows`` as they are counted."""
    from .feature_json import check_source

    layers = check_source(store, source, layers)
    keep = source_sequence_filter(store, source)
    con = store.con.cursor()
    try:
        per_domain, per_region, bins, tokens = _token_totals(con, store, keep)
        total = source_total_tokens(store, source)
        document: dict = {"total_tokens": total, "tokens_per_domain": per_domain, "tokens_per_region": per_region,
                          "tokens_per_thinking_bin": bins, "features": []}
        if source == "neuron":
            document["is_neuron_baseline"] = True
        for layer in layers:
            approx = None
            if source == "neuron" and store.manifest_obj.files("neuron_counts", "neuron"):
                counts, approx = _neuron_layer_counts(con, store, layer, tokens)
            else:
                counts = _layer_counts(con, store, source, layer, tokens)
            add_rows(_feature_rows(counts, layer, (total, per_domain, per_region, bins), source == "neuron", approx))
    finally:
        con.close()
    return document


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def metadata_bytes(store, source: str = "transcoder", layers: list[int] | None = None) -> bytes:
    """``json.dumps(feature_metadata(...))`` byte for byte, without holding every feature's dict: each layer's rows
    become text as soon as they are counted (the dicts of 229k features took most of the peak memory)."""
    texts: list[str] = []
    document = _metadata(store, source, layers, lambda rows: texts.append(",".join(map(_dumps, rows))))
    head, tail = _dumps(document).split('"features":[]', 1)
    return "".join([head, '"features":[', ",".join(t for t in texts if t), "]", tail]).encode("ascii")


def export_metadata(store, out_dir: str | os.PathLike, *, source: str = "transcoder", layers: list[int] | None = None) -> Path:
    """Write ``out_dir/feature_metadata.json`` atomically; returns its path."""
    path = Path(out_dir) / "feature_metadata.json"
    data = metadata_bytes(store, source, layers)
    created = ensure_writable_parent(path)
    from featurestore.errors import UserError

    try:
        return write_bytes_atomic(path, data)
    except OSError as exc:
        remove_if_empty(created)  # a failed export leaves no empty folder behind
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
