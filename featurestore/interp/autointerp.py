"""Auto-interp: describe each feature from an explanation split, then score the description by detection.

Per feature the explainer sees top examples and lower-quantile examples; detection is scored on held-out
positives it never saw (a seeded part of the top pool, and other lower-quantile examples; no window
shares a token with an explained one) mixed with verified all-zero windows matched in domain, region and
extent, all rendered identically, with no base rate in the prompt. Metrics per feature and condition;
a control pass scores every feature with another feature's description on the same excerpts.

Other scorers on the same held-out sets (``scorers``): fuzzing (are the marked tokens the right ones,
``fuzzing.py``) and embedding similarity (AUROC, ``embedding.py``). The explainer, the chat scorer and the
embeddings model can be different models at different endpoints; each row records the one that answered.
``descriptions`` re-scores existing descriptions (an earlier run's, or a file's) with no explain request.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass

from .answers import EXPLANATION_SCHEMA, detection_schema, validate_detection, validate_explanation
from ..errors import UserError
from .classify import DryRun
from .client import JudgeClient, JudgeSettings, resolve_api_key
from .embedding import EmbeddingClient, score_embedding
from .evidence import EvidenceBuilder, EvidenceSettings, FeatureEvidence
from .fuzzing import FuzzSet, build_fuzz_set, score_fuzzing
from .metrics import Confusion, format_scorer_summary, format_summary, summarize, summarize_scorers
from .negatives import DetectionSet, NegativeSampler, assemble
from .prompts import AUTOINTERP_VERSION, FUZZ_VERSION, detect_messages, explain_messages, fuzz_messages
from .replay import ScoringRun, load_replay
from .rescore import Descriptions, resolve as resolve_descriptions
from .runner import JudgeRun, PrepareFailed, RunSummary, batches_by_layer, open_run, pipeline, RunLock
from .sampling import select_features
from .tables import InterpWriter, finished_keys, read_rows

KIND = "autointerp"
CONDITIONS = ("top", "lower")
SCORERS = ("detection", "fuzzing", "embedding")
DEFAULT_N_TEST = 25  # per condition: 25 positives + 25 negatives give a balanced-accuracy 95% CI of width ~0.22 at 0.8
DESCRIPTION_PLACEHOLDER = "<the description written by the explain step>"


@dataclass
class AutointerpJob:
    layer: int
    feature: int
    evidence: FeatureEvidence | None  # what the explainer sees (None when only the excerpts are needed)
    sets: dict[str, DetectionSet]  # held-out detection excerpts per condition
    fuzz: dict[str, FuzzSet] | None = None  # the same held-out positives, marked right or wrong (fuzzing)


def prepare_batch(builder: EvidenceBuilder, sampler: NegativeSampler, layer: int, features: list[int],
                  fuzzing: bool = False) -> list[AutointerpJob]:
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
        c: assemble(layer, f, c, positives[f][c], negatives[f][c], builder.seed, builder.source) for c in CONDITIONS},
        {c: build_fuzz_set(layer, f, c, positives[f][c], builder.seed, builder.source) for c in CONDITIONS}
        if fuzzing else None) for f in features]


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
               flush_seconds: float = 5.0, batch_size: int = 16, api_key: str | None = None,
               scorers=("detection",), scorer: JudgeSettings | None = None, embeddings: JudgeSettings | None = None,
               descriptions: Descriptions | str | None = None):
    """Explain and score a seeded sample of live features; returns a RunSummary (or a DryRun).

    ``judge`` explains (and scores, unless ``scorer`` is given); ``embeddings`` is the embeddings model for the
    embedding scorer; ``descriptions`` (a Descriptions, a run id or a JSON file) re-scores existing descriptions
    of exactly those features (``layers``/``features`` narrow them) without any explain request.
    """
    judge = judge or JudgeSettings()
    ev = evidence or EvidenceSettings(n_test_top=DEFAULT_N_TEST, n_test_lower=DEFAULT_N_TEST)
    scorers = _check_scorers(scorers, embeddings)
    if isinstance(descriptions, str):
        descriptions = resolve_descriptions(store.path, descriptions)
    if min_examples is None:
        min_examples = ev.n_test_top + ev.n_test_lower + 10
    if descriptions is not None:
        selected = _described_selection(store, source, descriptions, layers, features)
    else:
        selected = select_features(store, source, n_per_layer=n_per_layer, seed=seed, min_freq=min_freq,
                                   min_examples=min_examples, layers=layers, features=features)
    decisive = {"source": source, "seed": seed, "evidence": asdict(ev)}
    if scorers != ("detection",):
        decisive["scorers"] = list(scorers)
    if "fuzzing" in scorers:
        decisive["fuzz_prompt"] = FUZZ_VERSION
    if scorer is not None:
        decisive["scorer"] = _identity_of(scorer)
    if embeddings is not None and "embedding" in scorers:
        decisive["embeddings"] = _identity_of(embeddings)
    if descriptions is not None:
        decisive["descriptions"] = {"origin": descriptions.origin, "digest": descriptions.digest()}
    invocation = {"n_per_layer": n_per_layer, "min_freq": min_freq, "min_examples": min_examples, "layers": layers,
                  "features": features, "control": control, "n_selected": len(selected),
                  "selected_per_layer": _per_layer(selected)}
    rid, resumed, run_row = open_run(store.path, KIND, judge, AUTOINTERP_VERSION, decisive, invocation, rerun, run_id)
    chat_scoring = bool({"detection", "fuzzing"} & set(scorers))
    keys = {}
    if not dry_run:  # fail before anything is written
        if descriptions is None:
            keys["explain"] = api_key or resolve_api_key(judge.resolved_base_url())
        if chat_scoring:
            keys["score"] = api_key or resolve_api_key((scorer or judge).resolved_base_url())
        if "embedding" in scorers:
            keys["embed"] = api_key or resolve_api_key(embeddings.resolved_base_url())
    lock = None if dry_run else RunLock(store.path, rid)  # before reading what is finished
    described = _explained(store.path, rid) if resumed else {}  # (layer, feature) -> description, ok rows only
    scored = _scored(store.path, rid) if resumed else set()
    imported = []
    if descriptions is not None:
        imported = [k for k in selected if k not in described]
        described.update({k: descriptions.rows[k]["description"] for k in imported})
    todo = [(l, f) for l, f in selected if (l, f) not in described
            or any((l, f, s, c, False) not in scored for s in scorers for c in CONDITIONS)]
    builder = EvidenceBuilder(store, source, ev, seed)
    sampler = NegativeSampler(builder)
    fuzzing = "fuzzing" in scorers
    if dry_run:
        return _dry_run(builder, sampler, rid, selected, todo, described, scored, control, scorers)
    writer = InterpWriter(store.path, rid, flush_rows=flush_rows, flush_seconds=flush_seconds)
    writer.add("runs", run_row)

    replay = load_replay(store.path, rid, sorted(set(todo) | set(selected) if control else set(todo))) if resumed else {}

    async def main() -> list[JudgeRun]:
        runs: dict[str, ScoringRun] = {}
        if "explain" in keys:
            runs["explain"] = ScoringRun(store, JudgeClient(judge, api_key=keys["explain"]), writer, rid, source,
                                         AUTOINTERP_VERSION, progress)
        if chat_scoring:
            runs["score"] = runs["explain"] if scorer is None and "explain" in runs else ScoringRun(
                store, JudgeClient(scorer or judge, api_key=keys["score"]), writer, rid, source, AUTOINTERP_VERSION, progress)
        if "embedding" in scorers:
            runs["embed"] = ScoringRun(store, EmbeddingClient(embeddings, api_key=keys["embed"]), writer, rid, source,
                                       AUTOINTERP_VERSION, progress)
        for run in runs.values():
            run.replay = replay  # shared: an answer is taken once
        any_run = next(iter(runs.values()))
        for key in imported:  # re-scoring: the descriptions become this run's explanations, with their authors
            row = descriptions.rows[key]
            writer.add("explanations", {**any_run.identity(*key), **row, "status": "ok", "n_requests": 0})

        kept: dict[tuple[int, int], AutointerpJob] = {}  # phase-1 excerpts, reused by the controls

        def prepare(layer: int, feats: list[int]) -> list[AutointerpJob]:
            return prepare_batch(builder, sampler, layer, feats, fuzzing)

        def prepare_control(layer: int, feats: list[int]) -> list[AutointerpJob]:
            missing = [f for f in feats if (layer, f) not in kept]  # done by an earlier invocation
            built = {job.feature: job for job in prepare_batch(builder, sampler, layer, missing, fuzzing)} if missing else {}
            return [built.get(f) or kept[layer, f] for f in feats]

        async def score_all(job: AutointerpJob, description: str, owner: tuple[int, int], control: bool) -> None:
            tasks = []
            for c in CONDITIONS:
                if "detection" in scorers and (job.layer, job.feature, "detection", c, control) not in scored:
                    tasks.append(("detection_scores", score(runs["score"], job, c, description, owner, control)))
                if fuzzing and (job.layer, job.feature, "fuzzing", c, control) not in scored:
                    tasks.append(("scorer_scores", score_fuzzing(runs["score"], job.layer, job.feature, job.fuzz[c],
                                                                 description, owner, control)))
                if "embedding" in scorers and (job.layer, job.feature, "embedding", c, control) not in scored:
                    tasks.append(("scorer_scores", score_embedding(runs["embed"], job.layer, job.feature, job.sets[c],
                                                                   description, owner, control)))
            async def write_when_done(table: str, task) -> None:  # each result as soon as it is in
                writer.add(table, await task)

            await asyncio.gather(*[write_when_done(table, task) for table, task in tasks])

        def failed_scores(job: PrepareFailed, control: bool) -> None:
            layer, feature = job.item
            for c in CONDITIONS:
                for name, table, run in (("detection", "detection_scores", runs.get("score")),
                                         ("fuzzing", "scorer_scores", runs.get("score")),
                                         ("embedding", "scorer_scores", runs.get("embed"))):
                    if name in scorers:
                        writer.add(table, {**run.identity(layer, feature), "scorer": name, "condition": c,
                                           "control": control, "status": "error", "error": job.error, "n_requests": 0})

        async def explain_and_score(job) -> None:
            if isinstance(job, PrepareFailed):
                layer, feature = job.item
                if job.item not in described:
                    writer.add("explanations", {**(runs.get("explain") or any_run).identity(layer, feature),
                                                "status": "error", "error": job.error, "n_requests": 0})
                else:
                    failed_scores(job, False)
                return
            key = (job.layer, job.feature)
            kept[key] = AutointerpJob(job.layer, job.feature, None, job.sets, job.fuzz)  # compact: no explainer evidence
            if key not in described:
                row = await explain(runs["explain"], job)
                writer.add("explanations", row)
                if row["status"] != "ok":
                    return
                described[key] = row["description"]
            await score_all(job, described[key], key, False)

        async def score_control(job) -> None:
            if isinstance(job, PrepareFailed):
                failed_scores(job, True)
                return
            donor = donors[(job.layer, job.feature)]
            await score_all(job, described[donor], donor, True)

        try:
            await pipeline(batches_by_layer(todo, batch_size), prepare, explain_and_score, judge.concurrency,
                           "explain+score" if descriptions is None else "score", progress,
                           tick=writer.flush, tick_seconds=flush_seconds, status=runs.get("score") or any_run)
            donors = control_donors([k for k in selected if k in described], seed) if control else {}
            pending = [k for k in selected if k in donors
                       and any((*k, s, c, True) not in scored for s in scorers for c in CONDITIONS)]
            await pipeline(batches_by_layer(pending, batch_size), prepare_control, score_control, judge.concurrency,
                           "control", progress,
                           tick=writer.flush, tick_seconds=flush_seconds, status=runs.get("score") or any_run)
        finally:
            for run in {id(r): r for r in runs.values()}.values():
                await run.client.close()
        return list({id(r): r for r in runs.values()}.values())

    try:
        used = asyncio.run(main())
    finally:
        writer.close()
        builder.close()
        lock.release()
        store.refresh()
    return _summary(store.path, rid, resumed, selected, todo, used, scorers)


def _check_scorers(scorers, embeddings) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in (scorers.split(",") if isinstance(scorers, str) else scorers)))
    unknown = [s for s in names if s not in SCORERS]
    if unknown or not names:
        raise UserError(f"unknown scorer {', '.join(unknown) or '(none)'}: choose from {', '.join(SCORERS)}")
    if "embedding" in names and (embeddings is None or not embeddings.model):
        raise UserError("the embedding scorer needs an embeddings model (--embeddings-model)")
    return tuple(s for s in SCORERS if s in names)


def _identity_of(settings: JudgeSettings) -> dict:
    return {"model": settings.model, "host": settings.base_url_host(), "max_output_tokens": settings.max_output_tokens,
            "temperature": settings.temperature}


def _per_layer(selected: list[tuple[int, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for layer, _ in selected:
        out[str(layer)] = out.get(str(layer), 0) + 1
    return out


def _described_selection(store, source: str, descriptions: Descriptions, layers, features) -> list[tuple[int, int]]:
    """The described features to re-score (narrowed by layers/features); every one must be live in the store."""
    from ..collect_options import parse_layers
    from .sampling import parse_feature_list

    keys = sorted(descriptions.rows)
    wanted = parse_feature_list(features) if isinstance(features, str) else features
    if wanted:
        missing = [f"{l}:{f}" for l, f in wanted if (l, f) not in descriptions.rows]
        if missing:
            raise UserError(f"no description in {descriptions.origin} for {', '.join(missing[:10])}")
        keys = sorted(wanted)
    layer_set = parse_layers(layers) if isinstance(layers, str) else layers
    if layer_set is not None:
        keys = [k for k in keys if k[0] in set(layer_set)]
    if not keys:
        raise UserError(f"no described feature of {descriptions.origin} is in the chosen layers")
    return select_features(store, source, n_per_layer=1, seed=0, features=keys)


def _scored(root, rid: str) -> set[tuple]:
    """(layer, feature, scorer, condition, control) finished in this run, for every scorer."""
    done = {(l, f, "detection", c, k) for l, f, c, k in
            finished_keys(root, "detection_scores", rid, ("layer", "feature", "condition", "control"))}
    return done | finished_keys(root, "scorer_scores", rid, ("layer", "feature", "scorer", "condition", "control"))


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


def _dry_run(builder, sampler, rid, selected, todo, described, scored, control, scorers) -> DryRun:
    shown = []
    for layer, feats in batches_by_layer(todo[:2], 2):
        for job in prepare_batch(builder, sampler, layer, feats, "fuzzing" in scorers):
            key = (job.layer, job.feature)
            description = described.get(key, DESCRIPTION_PLACEHOLDER)
            if key not in described:
                shown.append((f"explain L{layer}F{job.feature}", explain_messages(job.evidence)))
            if "detection" in scorers:
                shown.append((f"detect (top) L{layer}F{job.feature}", detect_messages(description, job.sets["top"].texts)))
            if "fuzzing" in scorers:
                shown.append((f"fuzz (top) L{layer}F{job.feature}", fuzz_messages(description, job.fuzz["top"].texts)))
            if "embedding" in scorers:
                inputs = [description] + job.sets["top"].texts
                shown.append((f"embed (top) L{layer}F{job.feature}: {len(inputs)} inputs",
                               [{"role": "input", "content": text} for text in inputs[:2]]))
    builder.close()
    n = sum((k not in described) + sum((*k, s, c, False) not in scored for s in scorers for c in CONDITIONS)
            for k in todo)
    if control and len(selected) > 1:
        n += sum((*k, s, c, True) not in scored for k in selected for s in scorers for c in CONDITIONS)
    return DryRun(rid, len(selected), len(selected) - len(todo), n, shown)


def _summary(root, rid, resumed, selected, todo, runs: list[JudgeRun], scorers) -> RunSummary:
    wanted = set(selected)
    latest: dict[tuple, dict] = {}
    for row in read_rows(root, "detection_scores", rid):
        latest[(row["layer"], row["feature"], "detection", row["condition"], row["control"])] = row
    for row in read_rows(root, "scorer_scores", rid):
        latest[(row["layer"], row["feature"], row["scorer"], row["condition"], row["control"])] = row
    counts: dict[str, int] = {}
    latest_expl: dict[tuple, str] = {}
    for row in read_rows(root, "explanations", rid, columns="layer, feature, status, created_at"):
        latest_expl[(row["layer"], row["feature"])] = row["status"]
    for key in selected:
        status = latest_expl.get(key, "missing")
        counts[status] = counts.get(status, 0) + 1
    failed = {k for k, s in latest_expl.items() if s == "error"} | {k[:2] for k, r in latest.items() if r["status"] == "error"}
    summary = RunSummary(rid, KIND, resumed, len(selected), len(selected) - len(todo), counts,
                         sum(r.n_requests for r in runs), sum(r.prompt_tokens for r in runs),
                         sum(r.completion_tokens for r in runs), n_failed=len(failed & wanted))
    rows = [r for k, r in latest.items() if (k[0], k[1]) in wanted]
    reports = []
    if "detection" in scorers:
        reports.append(format_summary(summarize([r for r in rows if r.get("scorer") is None])))
    if scorers != ("detection",):
        reports.append(format_scorer_summary(summarize_scorers(rows)))
    summary.report = "\n".join(reports)
    return summary
