"""Fuzzing: does the description pick out the right tokens, not just the right contexts?

The scorer sees held-out activating windows (the detection positives of a condition) with some tokens
marked. About half (seeded) carry the correct marking: exactly the tokens where the feature is active in
the store. The others carry a wrong marking of the same size on tokens of the same window where the
feature is exactly 0 (a window with no such token keeps its correct marking). The judge says, per
excerpt, whether the marking is right for the description; metrics are detection's (label = marking is
correct), per condition, with a per-feature interval on balanced accuracy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .answers import detection_schema, validate_detection
from .metrics import Confusion, balanced_accuracy_interval
from .prompts import fuzz_messages, fuzz_text

SCORER = "fuzzing"


@dataclass
class FuzzSet:
    condition: str
    texts: list[str]
    items: list[dict]  # seq_id, pos, window_start, window_end, label, marks (absolute positions), act

    @property
    def labels(self) -> list[bool]:
        return [item["label"] for item in self.items]


def build_fuzz_set(layer: int, feature: int, condition: str, positives: list, seed: int, source: str) -> FuzzSet:
    """Correct and wrong markings of the held-out activating windows, shuffled (seeded)."""
    tag = f"{seed}:{source}:{layer}:{feature}:{condition}:fuzz"
    order = list(range(len(positives)))
    random.Random(tag).shuffle(order)
    wrong = set(order[:len(order) // 2])
    entries = []
    for i, ex in enumerate(positives):
        active = [j for j, act in enumerate(ex.acts) if act > 0]
        zero = [j for j, act in enumerate(ex.acts) if act == 0]
        if i in wrong and zero:
            marked = sorted(random.Random(f"{tag}:{i}").sample(zero, min(len(zero), max(1, len(active)))))
            label = False
        else:
            marked, label = active, True
        entries.append((ex, marked, label))
    random.Random(f"{tag}:order").shuffle(entries)
    items, texts = [], []
    for ex, marked, label in entries:
        start = ex.pos - ex.train_token_ind
        items.append({"seq_id": ex.seq_id, "pos": ex.pos, "window_start": start, "window_end": start + len(ex.tokens) - 1,
                      "label": label, "marks": [start + j for j in marked], "act": ex.act})
        texts.append(fuzz_text(list(ex.tokens), marked))
    return FuzzSet(condition, texts, items)


def example_rows(identity: dict, fuzz: FuzzSet, control: bool, predictions: list[bool] | None) -> list[dict]:
    return [{**identity, **item, "scorer": SCORER, "condition": fuzz.condition, "control": control, "item": i + 1,
             "prediction": None if predictions is None else predictions[i], "similarity": None}
            for i, item in enumerate(fuzz.items)]


async def score_fuzzing(run, layer: int, feature: int, fuzz: FuzzSet, description: str, owner: tuple[int, int],
                        control: bool) -> dict:
    """One fuzzing request; writes the per-excerpt rows and returns the scorer_scores row."""
    identity = run.identity(layer, feature)
    labels = fuzz.labels
    base = {**identity, "scorer": SCORER, "condition": fuzz.condition, "control": control,
            "description_layer": owner[0], "description_feature": owner[1],
            "n_positives": sum(labels), "n_negatives": len(labels) - sum(labels)}
    if not any(labels) or all(labels):
        missing = "held-out activating windows" if not labels else (
            "wrongly marked excerpts (no window has an inactive token)" if all(labels) else "correctly marked excerpts")
        return {**base, "status": "skipped", "error": f"no {missing} for this condition", "n_requests": 0}
    n = len(fuzz.texts)
    asked = await run.ask(layer, feature, f"{'control-fuzz' if control else 'fuzz'}:{fuzz.condition}",
                          fuzz_messages(description, fuzz.texts), "feature_fuzzing", detection_schema(n),
                          lambda text: validate_detection(text, n))
    run.writer.add("scorer_examples", example_rows(identity, fuzz, control, asked.value))
    row = {**base, **asked.outcome()}
    if asked.value is not None:
        confusion = Confusion.of(labels, asked.value)
        row.update(confusion.row())
        row["score"] = row["balanced_accuracy"]
        row["ci_low"], row["ci_high"] = balanced_accuracy_interval(confusion.tp, confusion.fn, confusion.tn, confusion.fp)
    return row
