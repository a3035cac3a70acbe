"""Judge results out of the store in the original files' schemas (feature_classifications.json, autointerp.json).

Existing notebooks read these files unchanged: the original keys are all present with their types and
meaning kept. ``detection_*_{accuracy,precision,recall}`` are always numbers, as in the original: a condition
that could not be scored is written 0.0 and named in the feature's ``missing_conditions`` (the metadata says
so). ``n_examples`` keeps the original's count (classification: top examples shown; auto-interp: top plus
random examples of the feature's JSON); the counts of this pipeline have their own names. ``n_per_layer`` is
the most features any layer ran when ``--features`` (or re-scoring) chose them, and ``features_per_layer``
says exactly what ran. Additions are extra keys: the run id, endpoints and models, prompt version, error
counts, balanced accuracy, F1 and per-feature intervals, the control scores and every other scorer's
results (``fuzzing_*``, ``embedding_*``). ``*_random_*`` holds this pipeline's lower-quantile condition
(held-out positives from the lower activation quantiles), the closest thing to the original's random samples.
Only features whose judge call succeeded are listed; ``metadata.n_errors`` counts the others.
"""
from __future__ import annotations

import json
from pathlib import Path

from featurestore.errors import UserError
from featurestore.ids import cantor
from featurestore.interp.metrics import METRICS, balanced_accuracy_interval, summarize, summarize_scorers
from featurestore.storage import write_bytes_atomic

ORIGINAL_TOP, ORIGINAL_RANDOM = 20, 10  # examples per feature JSON in the original (top, random samples)
MISSING_CONDITION = ("a condition that could not be scored (no held-out positives or verified negatives, the request "
                     "failed, or the scorer did not run) is written as 0.0 in detection_<condition>_{accuracy,precision,"
                     "recall} and named in the feature's missing_conditions; the means skip it. Other scorers' keys are "
                     "null when missing.")
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
    rows = _records(store, "SELECT c.*, f.activation_count FROM classifications c LEFT JOIN features f "
                           "USING (source, layer, feature) WHERE c.run_id = ? AND c.status = 'ok' ORDER BY layer, feature",
                    [run["run_id"]])
    logits = _top_logits(store, settings.get("source", "transcoder"))
    n_top = (settings.get("evidence") or {}).get("n_top", 10)
    features = [{
        "layer": r["layer"], "feature": r["feature"], "cantor_id": cantor(r["layer"], r["feature"]),
        **{k: r[k] for k in CLASSIFICATION_KEYS}, "llm_reasoning": r["reasoning"],
        "n_examples": min(n_top, r["activation_count"] or 0),  # the original's: top examples shown
        "activation_freq": r["activation_freq"], "top_logits": logits.get((r["layer"], r["feature"]), []),
        "n_examples_shown": r["n_examples"],  # top plus lower-quantile examples shown to the judge
    } for r in rows]
    counts = _status_counts(store, "classifications", run["run_id"])
    n_per_layer, per_layer = _what_ran(store, "classifications", run)
    metadata = {
        "input_dir": str(store.path), "model": run["judge_model"], "n_per_layer": n_per_layer,
        "min_freq": settings.get("min_freq"), "seed": settings.get("seed"), "n_classified": len(features),
        "features_per_layer": per_layer, "features_chosen": bool(settings.get("features")),
        "run_id": run["run_id"], "base_url_host": run["base_url_host"], "prompt_version": run["prompt_version"],
        "source": settings.get("source"), "n_errors": counts.get("error", 0), "n_skipped": counts.get("skipped", 0),
    }
    return {"metadata": metadata, "features": features}


def _what_ran(store, table: str, run: dict) -> tuple[int | None, dict[str, int]]:
    """(n_per_layer as the original means it, features per layer that ran): when features were chosen rather than
    sampled, n_per_layer is the most features any layer ran."""
    settings = run["settings"]
    per_layer = {str(l): n for l, n in store.con.execute(
        f"SELECT layer, count(DISTINCT feature) FROM {table} WHERE run_id = ? GROUP BY 1 ORDER BY 1",
        [run["run_id"]]).fetchall()}
    chosen = bool(settings.get("features")) or "descriptions" in settings
    return (max(per_layer.values(), default=0) if chosen else settings.get("n_per_layer")), per_layer


def _condition_name(condition: str) -> str:
    return "top" if condition == "top" else "random"


def _scores_by_feature(rows: list[dict]) -> dict[tuple[int, int], dict]:
    """Detection rows (``scorer`` absent) and other scorers' rows as export keys per feature."""
    out: dict[tuple[int, int], dict] = {}
    for r in rows:
        if r["status"] != "ok":
            continue
        scorer = r.get("scorer") or "detection"
        kind = "control" if r["control"] else "detection"
        if scorer != "detection":
            kind = f"control_{scorer}" if r["control"] else scorer
        prefix = f"{kind}_{_condition_name(r['condition'])}"
        target = out.setdefault((r["layer"], r["feature"]), {})
        if scorer == "embedding":
            target[f"{prefix}_auroc"] = r["auroc"]
        else:
            for metric in METRICS:
                target[f"{prefix}_{metric}"] = r[metric]
        if scorer == "detection" and not r["control"]:
            target[f"{prefix}_ci_low"], target[f"{prefix}_ci_high"] = balanced_accuracy_interval(
                r["tp"], r["fn"], r["tn"], r["fp"])
        elif not r["control"]:
            target[f"{prefix}_ci_low"], target[f"{prefix}_ci_high"] = r["ci_low"], r["ci_high"]
        if not r["control"]:
            target[f"{prefix}_n_positives"], target[f"{prefix}_n_negatives"] = r["n_positives"], r["n_negatives"]
        else:
            target[f"{prefix}_description_of"] = [r["description_layer"], r["description_feature"]]
    return out


def autointerp_document(store, run_id: str | None = None) -> dict:
    run = resolve_run(store, "autointerp", run_id)
    settings = run["settings"]
    rid = run["run_id"]
    explained = _records(store, "SELECT e.*, f.activation_count FROM explanations e LEFT JOIN features f "
                                "USING (source, layer, feature) WHERE e.run_id = ? AND e.status = 'ok' "
                                "ORDER BY layer, feature", [rid])
    scores = _records(store, "SELECT * FROM detection_scores WHERE run_id = ?", [rid])
    other = _records(store, "SELECT * FROM scorer_scores WHERE run_id = ?", [rid])
    by_feature = _scores_by_feature(scores + other)
    features = []
    for r in explained:
        key = (r["layer"], r["feature"])
        found = by_feature.get(key, {})
        row = {"layer": r["layer"], "feature": r["feature"], "cantor_id": cantor(*key), "description": r["description"],
               "reasoning": r["reasoning"] or ""}
        missing = []
        for prefix in ("detection_top", "detection_random"):
            if f"{prefix}_accuracy" not in found:
                missing.append(prefix)
            for metric in ("accuracy", "precision", "recall"):
                row[f"{prefix}_{metric}"] = float(found.get(f"{prefix}_{metric}", 0.0))
        count = r["activation_count"] or 0
        row["n_examples"] = min(ORIGINAL_TOP, count) + min(ORIGINAL_RANDOM, count)  # the original's meaning
        row["activation_freq"] = r["activation_freq"]
        row["missing_conditions"] = missing
        row["n_examples_explained"] = r["n_examples"]  # examples the explainer saw (null for imported descriptions)
        row["explainer_model"] = r["judge_model"]
        row.update({k: v for k, v in found.items() if k not in row})
        features.append(row)
    summary = summarize(scores, seed=settings.get("seed", 0))

    def mean_of(condition: str, control: bool = False) -> float | None:
        line = next((s for s in summary if s["condition"] == condition and s["control"] == control), None)
        return line["accuracy"]["mean"] if line else None

    evidence = settings.get("evidence", {})
    counts = _status_counts(store, "explanations", rid)
    n_per_layer, per_layer = _what_ran(store, "explanations", run)
    scorer = settings.get("scorer") or {}
    embeddings = settings.get("embeddings") or {}
    metadata = {
        "input_dir": str(store.path), "data_path": store.manifest.get("data", {}).get("path"),
        "model": run["judge_model"], "tokenizer": store.manifest.get("model", {}).get("name"),
        "max_tokens": evidence.get("before", 0) + evidence.get("after", 0) + 1,
        "n_per_layer": n_per_layer, "min_freq": settings.get("min_freq"), "seed": settings.get("seed"),
        "n_processed": len(features), "mean_detection_top_accuracy": mean_of("top"),
        "mean_detection_random_accuracy": mean_of("lower"),
        "run_id": rid, "base_url_host": run["base_url_host"], "prompt_version": run["prompt_version"],
        "source": settings.get("source"), "n_errors": counts.get("error", 0), "n_skipped": counts.get("skipped", 0),
        "features_per_layer": per_layer, "features_chosen": bool(settings.get("features")),
        "scorers": settings.get("scorers", ["detection"]),
        "scorer_model": scorer.get("model", run["judge_model"]), "scorer_host": scorer.get("host", run["base_url_host"]),
        "embeddings_model": embeddings.get("model"), "embeddings_host": embeddings.get("host"),
        "descriptions_from": (settings.get("descriptions") or {}).get("origin"),
        "n_test_per_condition": {"top": evidence.get("n_test_top"), "random": evidence.get("n_test_lower")},
        "detection_random_means": "lower-quantile held-out positives (not the explainer's examples)",
        "missing_values": MISSING_CONDITION,
        "n_examples_means": f"top plus random examples of the feature's JSON, as in the original: "
                            f"min({ORIGINAL_TOP}, activations) + min({ORIGINAL_RANDOM}, activations)",
        "summary": summary,
        "scorer_summary": summarize_scorers(scores + other, seed=settings.get("seed", 0)),
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
