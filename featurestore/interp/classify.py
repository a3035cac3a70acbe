"""Classify features into the original taxonomy (language / domain / reasoning / uninterpretable) with an LLM judge.

The judge sees top examples with the activating token marked and activation values, lower-quantile
examples, top and bottom logit-lens tokens, and the feature's domain and region distribution. One row
per feature per run goes to ``interp/classifications``; failures are rows with ``status="error"``.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import asdict, dataclass

from .answers import CLASSIFICATION_SCHEMA, validate_classification
from .client import JudgeClient, JudgeSettings, resolve_api_key
from .evidence import EvidenceBuilder, EvidenceSettings, FeatureEvidence
from .prompts import CLASSIFY_VERSION, classify_messages
from .runner import JudgeRun, PrepareFailed, RunSummary, batches_by_layer, open_run, pipeline, RunLock
from .sampling import select_features
from .tables import InterpWriter, finished_keys

KIND = "classify"


@dataclass
class DryRun:
    run_id: str
    n_selected: int
    n_already_done: int
    n_requests: int
    prompts: list[tuple[str, list[dict]]]  # (title, messages)

    def text(self) -> str:
        out = []
        for title, messages in self.prompts:
            out.append(f"===== {title} =====")
            for message in messages:
                out.append(f"--- {message['role']} ---\n{message['content']}")
        out.append(f"===== {self.n_selected} features selected, {self.n_already_done} already done in run "
                   f"{self.run_id}: {self.n_requests} requests would be made (plus retries) =====")
        return "\n".join(out)


def classify(store, judge: JudgeSettings | None = None, *, n_per_layer: int = 250, min_freq: float = 1e-7,
             min_examples: int = 5, layers=None, features=None, source: str = "transcoder", seed: int = 42,
             evidence: EvidenceSettings | None = None, rerun: bool = False, run_id: str | None = None,
             dry_run: bool = False, progress: bool = True, flush_rows: int = 2000, flush_seconds: float = 5.0,
             batch_size: int = 16, api_key: str | None = None):
    """Classify a seeded sample of live features; returns a RunSummary (or a DryRun when ``dry_run``)."""
    judge = judge or JudgeSettings()
    evidence = evidence or EvidenceSettings()
    selected = select_features(store, source, n_per_layer=n_per_layer, seed=seed, min_freq=min_freq,
                               min_examples=min_examples, layers=layers, features=features)
    decisive = {"source": source, "seed": seed, "evidence": asdict(evidence)}
    invocation = {"n_per_layer": n_per_layer, "min_freq": min_freq, "min_examples": min_examples,
                  "layers": layers, "features": features, "n_selected": len(selected)}
    rid, resumed, run_row = open_run(store.path, KIND, judge, CLASSIFY_VERSION, decisive, invocation, rerun, run_id)
    if not dry_run:
        api_key = api_key or resolve_api_key(judge.resolved_base_url())  # fail before anything is written
    lock = None if dry_run else RunLock(store.path, rid)  # before reading what is finished
    done = finished_keys(store.path, "classifications", rid, ("source", "layer", "feature")) if resumed else set()
    todo = [(l, f) for l, f in selected if (source, l, f) not in done]
    builder = EvidenceBuilder(store, source, evidence, seed)
    if dry_run:
        shown = []
        for layer, feats in batches_by_layer(todo[:2], 2):
            for f, ev in builder.for_classification(layer, feats).items():
                shown.append((f"classify L{layer}F{f}", classify_messages(ev)))
        builder.close()
        return DryRun(rid, len(selected), len(selected) - len(todo), len(todo), shown)
    writer = InterpWriter(store.path, rid, flush_rows=flush_rows, flush_seconds=flush_seconds)
    writer.add("runs", run_row)
    counts: Counter = Counter()
    categories: Counter = Counter()

    async def main() -> JudgeRun:
        client = JudgeClient(judge, api_key=api_key)
        run = JudgeRun(store, client, writer, rid, source, CLASSIFY_VERSION, progress)

        async def handle(job) -> None:
            if isinstance(job, PrepareFailed):
                layer, feature = job.item
                row = {**run.identity(layer, feature), "status": "error", "error": job.error, "n_requests": 0}
            else:
                row = await classify_one(run, job)
            writer.add("classifications", row)
            counts[row["status"]] += 1
            if row["status"] == "ok":
                categories[row["category"]] += 1

        try:
            await pipeline(batches_by_layer(todo, batch_size), prepare, handle, judge.concurrency, "classify", progress,
                           tick=writer.flush, tick_seconds=flush_seconds, status=run)
        finally:
            await client.close()
        return run

    def prepare(layer: int, features: list[int]) -> list[FeatureEvidence]:
        return list(builder.for_classification(layer, features).values())

    try:
        run = asyncio.run(main())
    finally:
        writer.close()
        builder.close()
        lock.release()
        store.refresh()
    summary = RunSummary(rid, KIND, resumed, len(selected), len(selected) - len(todo), dict(counts), run.n_requests,
                         run.prompt_tokens, run.completion_tokens, n_failed=counts.get("error", 0))
    summary.report = "categories this invocation: " + (", ".join(f"{k} {v}" for k, v in categories.most_common()) or "none")
    return summary


async def classify_one(run: JudgeRun, evidence: FeatureEvidence) -> dict:
    layer, feature = evidence.layer, evidence.feature
    base = {**run.identity(layer, feature), "n_examples": len(evidence.shown()),
            "activation_freq": evidence.stats.get("activation_freq")}
    if not evidence.top:
        return {**base, "status": "skipped", "error": "no activating examples in the store", "n_requests": 0}
    asked = await run.ask(layer, feature, "classify", classify_messages(evidence), "feature_classification",
                          CLASSIFICATION_SCHEMA, validate_classification)
    row = {**base, **asked.outcome(), "created_at": run.identity(layer, feature)["created_at"]}
    if asked.value is not None:
        row.update(asked.value)
    return row
