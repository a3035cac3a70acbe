"""Judge results out of the store in the original files' schemas (feature_classifications.json, autointerp.json).

Existing notebooks read these files unchanged: the original keys are all present with their meaning kept.
Additions are extra keys: the run id, endpoint and prompt version, error counts, balanced accuracy and F1,
and the control scores. ``detection_random_*`` holds this pipeline's lower-quantile condition (held-out
positives from the lower activation quantiles), the closest thing to the original's random samples.
Only features whose judge call succeeded are listed; ``metadata.n_errors`` counts the others.
"""
from __future__ import annotations

import json
from pathlib import Path

from featurestore.errors import UserError
from featurestore.ids import cantor
from featurestore.interp.metrics import METRICS, summarize
from featurestore.storage import write_bytes_atomic

CLASSIFICATION_KEYS = ("category", "confidence", "mechanism", "domain_type", "category_description",
                       "mechanism_description", "input_pattern", "output_pattern")


def _records(store, query: str, params=None) -> list[dict]:
    rel = store.con.execute(query, params or [])
    names = [d[0] for d in rel.description]
    return [dict(zip(names, row)) for row in rel.fetchall()]


def resolve_run(store, kind: str, run_id: str | None = None) -> dict:
    """The run to export: ``run_id`` or the most recently started run of ``kind``; its latest invocation row."""
    runs = _records(store, "SELECT * FROM interp_runs WHERE kind = ? ORDER BY started_at", [kind])
    if run_id is not None:
        runs = [r for r in runs if r["run_id"] == run_id]
        if not runs:
            raise UserError(f"no {kind} run {run_id!r} in {store.path}")
    if not runs:
        raise UserError(f"no {kind} run in {store.path}: run `featurestore {kind}` first")
    latest = runs[-1]
    first = next(r for r in runs if r["run_id"] == latest["run_id"])
    return {**latest, "settings": json.loads(latest["settings"]), "first_started_at": first["started_at"]}


def _status_counts(store, table: str, run_id: str) -> dict[str, int]:
    return dict(store.con.execute(f"SELECT status, count(*) FROM {table} WHERE run_id = ? GROUP BY 1", [run_id]).fetchall())


def _top_logits(store, source: str) -> dict[tuple[int, int], list[str]]:
    out: dict[tuple[int, int], list[str]] = {}
    for layer, feature, token in store.con.execute(
            "SELECT layer, feature, token FROM logit_lens WHERE source = ? AND side = 'top' ORDER BY layer, feature, rank",
            [source]).fetchall():
        out.setdefault((layer, feature), []).append(token)
    return out


def classifications_document(store, run_id: str | None = None) -> dict:
    run = resolve_run(store, "classify", run_id)
    settings = run["settings"]
    rows = _records(store, "SELECT * FROM classifications WHERE run_id = ? AND status = 'ok' ORDER BY layer, feature",
                    [run["run_id"]])
    logits = _top_logits(store, settings.get("source", "transcoder"))
    features = [{
        "layer": r["layer"], "feature": r["feature"], "cantor_id": cantor(r["layer"], r["feature"]),
        **{k: r[k] for k in CLASSIFICATION_KEYS}, "llm_reasoning": r["reasoning"], "n_examples": r["n_examples"],
        "activation_freq": r["activation_freq"], "top_logits": logits.get((r["layer"], r["feature"]), []),
    } for r in rows]
    counts = _status_counts(store, "classifications", run["run_id"])
    metadata = {
        "input_dir": str(store.path), "model": run["judge_model"], "n_per_layer": settings.get("n_per_layer"),
        "min_freq": settings.get("min_freq"), "seed": settings.get("seed"), "n_classified": len(features),
        "run_id": run["run_id"], "base_url_host": run["base_url_host"], "prompt_version": run["prompt_version"],
        "source": settings.get("source"), "n_errors": counts.get("error", 0), "n_skipped": counts.get("skipped", 0),
    }
    return {"metadata": metadata, "features": features}


def _scores_by_feature(rows: list[dict]) -> dict[tuple[int, int], dict]:
    out: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        prefix = ("control_" if r["control"] else "detection_") + ("top" if r["condition"] == "top" else "random")
        target = out.setdefault((r["layer"], r["feature"]), {})
        for metric in METRICS:
            target[f"{prefix}_{metric}"] = r[metric]
        if r["control"]:
            target[f"{prefix}_description_of"] = [r["description_layer"], r["description_feature"]]
    return out


def autointerp_document(store, run_id: str | None = None) -> dict:
    run = resolve_run(store, "autointerp", run_id)
    settings = run["settings"]
    rid = run["run_id"]
    explained = _records(store, "SELECT * FROM explanations WHERE run_id = ? AND status = 'ok' ORDER BY layer, feature", [rid])
    scores = _records(store, "SELECT * FROM detection_scores WHERE run_id = ?", [rid])
    by_feature = _scores_by_feature(scores)
    features = []
    for r in explained:
        key = (r["layer"], r["feature"])
        row = {"layer": r["layer"], "feature": r["feature"], "cantor_id": cantor(*key), "description": r["description"],
               "reasoning": r["reasoning"]}
        for prefix in ("detection_top", "detection_random"):
            for metric in ("accuracy", "precision", "recall"):
                row[f"{prefix}_{metric}"] = by_feature.get(key, {}).get(f"{prefix}_{metric}")
        row["n_examples"] = r["n_examples"]
        row["activation_freq"] = r["activation_freq"]
        row.update({k: v for k, v in by_feature.get(key, {}).items() if k not in row})
        features.append(row)
    summary = summarize(scores, seed=settings.get("seed", 0))

    def mean_of(condition: str, control: bool = False) -> float | None:
        line = next((s for s in summary if s["condition"] == condition and s["control"] == control), None)
        return line["accuracy"]["mean"] if line else None

    evidence = settings.get("evidence", {})
    counts = _status_counts(store, "explanations", rid)
    metadata = {
        "input_dir": str(store.path), "data_path": store.manifest.get("data", {}).get("path"),
        "model": run["judge_model"], "tokenizer": store.manifest.get("model", {}).get("name"),
        "max_tokens": evidence.get("before", 0) + evidence.get("after", 0) + 1,
        "n_per_layer": settings.get("n_per_layer"), "min_freq": settings.get("min_freq"), "seed": settings.get("seed"),
        "n_processed": len(features), "mean_detection_top_accuracy": mean_of("top"),
        "mean_detection_random_accuracy": mean_of("lower"),
        "run_id": rid, "base_url_host": run["base_url_host"], "prompt_version": run["prompt_version"],
        "source": settings.get("source"), "n_errors": counts.get("error", 0), "n_skipped": counts.get("skipped", 0),
        "detection_random_means": "lower-quantile held-out positives (not the explainer's examples)",
        "summary": summary,
    }
    return {"metadata": metadata, "features": features}


def write_document(document: dict, out: str | Path) -> Path:
    out = Path(out)
    write_bytes_atomic(out, (json.dumps(document, indent=1, ensure_ascii=False, default=str) + "\n").encode())
    return out


def export_classifications(store, out: str | Path, run_id: str | None = None) -> Path:
    return write_document(classifications_document(store, run_id), out)


def export_autointerp(store, out: str | Path, run_id: str | None = None) -> Path:
    return write_document(autointerp_document(store, run_id), out)
