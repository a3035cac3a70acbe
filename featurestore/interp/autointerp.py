"""Auto-interp: describe each feature from an explanation split, then score the description by detection.

Per feature the explainer sees top examples and lower-quantile examples; detection is scored on held-out
positives it never saw (a seeded part of the top pool, and other lower-quantile examples; no window
shares a token with an explained one) mixed with verified all-zero windows matched in domain, region and
extent, all rendered identically, with no base rate in the prompt. Metrics per feature and condition;
a control pass scores every feature with another feature's description on the same excerpts.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass

from .answers import EXPLANATION_SCHEMA, detection_schema, validate_detection, validate_explanation
from .classify import DryRun
from .client import JudgeClient, JudgeSettings, resolve_api_key
from .evidence import EvidenceBuilder, EvidenceSettings, FeatureEvidence
from .metrics import Confusion, format_summary, summarize
from .negatives import DetectionSet, NegativeSampler, assemble
from .prompts import AUTOINTERP_VERSION, detect_messages, explain_messages
from .runner import JudgeRun, PrepareFailed, RunSummary, batches_by_layer, open_run, pipeline, RunLock
from .sampling import select_features
from .tables import InterpWriter, finished_keys, read_rows

KIND = "autointerp"
CONDITIONS = ("top", "lower")
DESCRIPTION_PLACEHOLDER = "<the description written by the explain step>"


@dataclass
class AutointerpJob:
    layer: int
    feature: int
    evidence: FeatureEvidence | None  # what the explainer sees (None when only the excerpts are needed)
    sets: dict[str, DetectionSet]  # held-out detection excerpts per condition


def prepare_batch(builder: EvidenceBuilder, sampler: NegativeSampler, layer: int, features: list[int]) -> list[AutointerpJob]:
    s = builder.settings
    split = builder.split_for_autointerp(layer, features)
    evidences = builder._assemble(layer, {f: split[f][0] for f in features})
    wanted = [(f, r[0], r[1], s.before, s.after) for f in features for c in CONDITIONS for r in split[f][1][c]]
    windows = iter(builder.windows(layer, wanted))
    positives = {f: {c: [next(windows) for _ in split[f][1][c]] for c in CONDITIONS} for f in features}
    avoid = {f: [(ex.seq_id, ex.pos) for ex in evidences[f].shown()] +
                [(ex.seq_id, ex.pos) for c in CONDITIONS for ex in positives[f][c]] for f in features}
    negatives = sampler.sample(layer, positives, avoid)
    return [AutointerpJob(layer, f, evidences[f], {
        c: assemble(layer, f, c, positives[f][c], negatives[f][c], builder.seed, builder.source) for c in CONDITIONS})
        for f in features]


def example_rows(identity: dict, detection: DetectionSet, control: bool, predictions: list[bool] | None) -> list[dict]:
    return [{**identity, **item, "condition": detection.condition, "control": control, "item": i + 1,
             "prediction": None if predictions is None else predictions[i]} for i, item in enumerate(detection.items)]


async def score(run: JudgeRun, job: AutointerpJob, condition: str, description: str, owner: tuple[int, int],
                control: bool) -> dict:
    """One detection request; writes the per-excerpt rows and returns the detection_scores row."""
    detection = job.sets[condition]
    identity = run.identity(job.layer, job.feature)
    base = {**identity, "condition": condition, "control": control, "description_layer": owner[0],
            "description_feature": owner[1], "n_positives": detection.n_positives, "n_negatives": detection.n_negatives}
    if not detection.n_positives or not detection.n_negatives:
        missing = "held-out positives" if not detection.n_positives else "verified non-activating windows"
        return {**base, "status": "skipped", "error": f"no {missing} for this condition", "n_requests": 0}
    n = len(detection.texts)
    purpose = f"{'control' if control else 'detect'}:{condition}"
    asked = await run.ask(job.layer, job.feature, purpose, detect_messages(description, detection.texts),
                          "feature_detection", detection_schema(n), lambda text: validate_detection(text, n))
    run.writer.add("detection_examples", example_rows(identity, detection, control, asked.value))
    row = {**base, **asked.outcome()}
    if asked.value is not None:
        row.update(Confusion.of(detection.labels, asked.value).row())
    return row


def control_donors(keys: list[tuple[int, int]], seed: int) -> dict[tuple[int, int], tuple[int, int]]:
    """Each feature gets another feature's description: a seeded shuffle, then each takes the next one's."""
    order = sorted(keys)
    random.Random(f"{seed}:control").shuffle(order)
    return {order[i]: order[(i + 1) % len(order)] for i in range(len(order))} if len(order) > 1 else {}


def autointerp(store, judge: JudgeSettings | None = None, *, n_per_layer: int = 100, min_freq: float = 1e-7,
               min_examples: int | None = None, layers=None, features=None, source: str = "transcoder", seed: int = 42,
               evidence: EvidenceSettings | None = None, control: bool = True, rerun: bool = False,
               run_id: str | None = None, dry_run: bool = False, progress: bool = True, flush_rows: int = 2000,
               flush_seconds: float = 5.0, batch_size: int = 16, api_key: str | None = None):
    """Explain and score a seeded sample of live features; returns a RunSummary (or a DryRun)."""
    judge = judge or JudgeSettings()
    ev = evidence or EvidenceSettings()
    if min_examples is None:
        min_examples = ev.n_test_top + ev.n_test_lower + 10
    selected = select_features(store, source, n_per_layer=n_per_layer, seed=seed, min_freq=min_freq,
                               min_examples=min_examples, layers=layers, features=features)
    decisive = {"source": source, "seed": seed, "evidence": asdict(ev)}
    invocation = {"n_per_layer": n_per_layer, "min_freq": min_freq, "min_examples": min_examples, "layers": layers,
                  "features": features, "control": control, "n_selected": len(selected)}
    rid, resumed, run_row = open_run(store.path, KIND, judge, AUTOINTERP_VERSION, decisive, invocation, rerun, run_id)
    if not dry_run:
        api_key = api_key or resolve_api_key(judge.resolved_base_url())  # fail before anything is written
    lock = None if dry_run else RunLock(store.path, rid)  # before reading what is finished
    described = _explained(store.path, rid) if resumed else {}  # (layer, feature) -> description, ok rows only
    scored = finished_keys(store.path, "detection_scores", rid, ("layer", "feature", "condition", "control")) if resumed else set()
    explained = set(described)
    todo = [(l, f) for l, f in selected if (l, f) not in explained
            or any((l, f, c, False) not in scored for c in CONDITIONS)]
    builder = EvidenceBuilder(store, source, ev, seed)
    sampler = NegativeSampler(builder)
    if dry_run:
        return _dry_run(builder, sampler, rid, selected, todo, explained, scored, control)
    writer = InterpWriter(store.path, rid, flush_rows=flush_rows, flush_seconds=flush_seconds)
    writer.add("runs", run_row)

    async def main() -> JudgeRun:
        client = JudgeClient(judge, api_key=api_key)
        run = JudgeRun(store, client, writer, rid, source, AUTOINTERP_VERSION, progress)

        kept: dict[tuple[int, int], dict[str, DetectionSet]] = {}  # phase-1 excerpts, reused by the controls

        def prepare(layer: int, feats: list[int]) -> list[AutointerpJob]:
            return prepare_batch(builder, sampler, layer, feats)

        def prepare_control(layer: int, feats: list[int]) -> list[AutointerpJob]:
            missing = [f for f in feats if (layer, f) not in kept]  # done by an earlier invocation
            built = {job.feature: job for job in prepare_batch(builder, sampler, layer, missing)} if missing else {}
            return [built.get(f) or AutointerpJob(layer, f, None, kept[layer, f]) for f in feats]

        async def explain_and_score(job) -> None:
            if isinstance(job, PrepareFailed):
                layer, feature = job.item
                writer.add("explanations", {**run.identity(layer, feature), "status": "error", "error": job.error,
                                            "n_requests": 0})
                return
            key = (job.layer, job.feature)
            kept[key] = job.sets
            if key not in described:
                row = await explain(run, job)
                writer.add("explanations", row)
                if row["status"] != "ok":
                    return
                described[key] = row["description"]
            rows = await asyncio.gather(*[score(run, job, c, described[key], key, False) for c in CONDITIONS
                                          if (job.layer, job.feature, c, False) not in scored])
            writer.add("detection_scores", list(rows))

        async def score_control(job) -> None:
            if isinstance(job, PrepareFailed):
                layer, feature = job.item
                writer.add("detection_scores", [{**run.identity(layer, feature), "condition": c, "control": True,
                                                 "status": "error", "error": job.error, "n_requests": 0}
                                                for c in CONDITIONS])
                return
            donor = donors[(job.layer, job.feature)]
            rows = await asyncio.gather(*[score(run, job, c, described[donor], donor, True) for c in CONDITIONS
                                          if (job.layer, job.feature, c, True) not in scored])
            writer.add("detection_scores", list(rows))

        try:
            await pipeline(batches_by_layer(todo, batch_size), prepare, explain_and_score, judge.concurrency,
                           "explain+detect", progress,
                           tick=writer.flush, tick_seconds=flush_seconds, status=run)
            donors = control_donors([k for k in selected if k in described], seed) if control else {}
            pending = [k for k in selected if k in donors and any((*k, c, True) not in scored for c in CONDITIONS)]
            await pipeline(batches_by_layer(pending, batch_size), prepare_control, score_control, judge.concurrency,
                           "control", progress,
                           tick=writer.flush, tick_seconds=flush_seconds, status=run)
        finally:
            await client.close()
        return run

    try:
        run = asyncio.run(main())
    finally:
        writer.close()
        builder.close()
        lock.release()
        store.refresh()
    return _summary(store.path, rid, resumed, selected, todo, run)


async def explain(run: JudgeRun, job: AutointerpJob) -> dict:
    evidence = job.evidence
    base = {**run.identity(job.layer, job.feature), "n_examples": len(evidence.shown()),
            "activation_freq": evidence.stats.get("activation_freq"),
            "explain_examples": [{"seq_id": ex.seq_id, "pos": ex.pos, "act": ex.act} for ex in evidence.shown()]}
    if not evidence.top:
        return {**base, "status": "skipped", "error": "no examples left for the explainer", "n_requests": 0}
    asked = await run.ask(job.layer, job.feature, "explain", explain_messages(evidence), "feature_explanation",
                          EXPLANATION_SCHEMA, validate_explanation)
    row = {**base, **asked.outcome()}
    if asked.value is not None:
        row.update(asked.value)
    return row


def _explained(root, run_id: str) -> dict[tuple[int, int], str]:
    latest: dict[tuple[int, int], dict] = {}
    for row in read_rows(root, "explanations", run_id, columns="layer, feature, status, description, created_at"):
        latest[(row["layer"], row["feature"])] = row
    return {k: r["description"] for k, r in latest.items() if r["status"] == "ok"}


def _dry_run(builder, sampler, rid, selected, todo, explained, scored, control) -> DryRun:
    shown = []
    for layer, feats in batches_by_layer(todo[:2], 2):
        for job in prepare_batch(builder, sampler, layer, feats):
            shown.append((f"explain L{layer}F{job.feature}", explain_messages(job.evidence)))
            shown.append((f"detect (top) L{layer}F{job.feature}",
                          detect_messages(DESCRIPTION_PLACEHOLDER, job.sets["top"].texts)))
    builder.close()
    n = sum((k not in explained) + sum((*k, c, False) not in scored for c in CONDITIONS) for k in todo)
    if control and len(selected) > 1:
        n += sum((*k, c, True) not in scored for k in selected for c in CONDITIONS)
    return DryRun(rid, len(selected), len(selected) - len(todo), n, shown)


def _summary(root, rid, resumed, selected, todo, run: JudgeRun) -> RunSummary:
    latest: dict[tuple, dict] = {}
    for row in read_rows(root, "detection_scores", rid):
        latest[(row["layer"], row["feature"], row["condition"], row["control"])] = row
    counts: dict[str, int] = {}
    latest_expl: dict[tuple, str] = {}
    for row in read_rows(root, "explanations", rid, columns="layer, feature, status, created_at"):
        latest_expl[(row["layer"], row["feature"])] = row["status"]
    for key in selected:
        status = latest_expl.get(key, "missing")
        counts[status] = counts.get(status, 0) + 1
    failed = {k for k, s in latest_expl.items() if s == "error"} | {k[:2] for k, r in latest.items() if r["status"] == "error"}
    summary = RunSummary(rid, KIND, resumed, len(selected), len(selected) - len(todo), counts, run.n_requests,
                         run.prompt_tokens, run.completion_tokens, n_failed=len(failed & set(selected)))
    wanted = set(selected)
    summary.report = format_summary(summarize([r for k, r in latest.items() if (k[0], k[1]) in wanted]))
    return summary
