"""Detection metrics per feature and run-level means with bootstrap confidence intervals.

Conventions (sklearn's ``zero_division=0``): precision is 0 when nothing was predicted active, recall is 0
when there were no positives, F1 is 0 when TP is 0. Balanced accuracy is the mean of the true-positive
and true-negative rates, over the classes present.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

METRICS = ("accuracy", "balanced_accuracy", "precision", "recall", "f1")


@dataclass(frozen=True)
class Confusion:
    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def of(cls, labels: list[bool], predictions: list[bool]) -> "Confusion":
        if len(labels) != len(predictions):
            raise ValueError("labels and predictions differ in length")
        pairs = list(zip(labels, predictions))
        return cls(tp=sum(l and p for l, p in pairs), fp=sum(p and not l for l, p in pairs),
                   tn=sum(not l and not p for l, p in pairs), fn=sum(l and not p for l, p in pairs))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def scores(self) -> dict[str, float]:
        positives, negatives = self.tp + self.fn, self.tn + self.fp
        predicted = self.tp + self.fp
        precision = self.tp / predicted if predicted else 0.0
        recall = self.tp / positives if positives else 0.0
        rates = ([self.tp / positives] if positives else []) + ([self.tn / negatives] if negatives else [])
        return {
            "accuracy": (self.tp + self.tn) / self.n if self.n else 0.0,
            "balanced_accuracy": sum(rates) / len(rates) if rates else 0.0,
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if self.tp else 0.0,
        }

    def row(self) -> dict:
        return {**asdict(self), **self.scores()}


def bootstrap_mean(values, n_resamples: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict:
    """Mean and percentile-bootstrap CI over features (resampling features with replacement)."""
    data = np.asarray([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if data.size == 0:
        return {"n": 0, "mean": None, "ci_low": None, "ci_high": None}
    if data.size == 1:
        return {"n": 1, "mean": float(data[0]), "ci_low": None, "ci_high": None}
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_resamples, data.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return {"n": int(data.size), "mean": float(data.mean()), "ci_low": float(low), "ci_high": float(high)}


def summarize(rows: list[dict], seed: int = 0) -> list[dict]:
    """One line per (condition, control) with the mean and CI of each metric over features with status ok."""
    groups: dict[tuple[str, bool], list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault((row["condition"], bool(row["control"])), []).append(row)
    out = []
    for (condition, control), members in sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        line = {"condition": condition, "control": control, "n_features": len(members)}
        for metric in METRICS:
            line[metric] = bootstrap_mean([m[metric] for m in members], seed=seed)
        out.append(line)
    return out


def format_summary(lines: list[dict]) -> str:
    """A small text table: mean [95% CI] per metric, controls after the real descriptions."""
    if not lines:
        return "no scored features"
    header = f"{'condition':<16}{'n':>5}  " + "  ".join(f"{m:<22}" for m in METRICS)
    text = [header]
    for line in lines:
        name = ("control " if line["control"] else "") + line["condition"]
        cells = []
        for metric in METRICS:
            s = line[metric]
            if s["mean"] is None:
                cells.append(f"{'-':<22}")
            elif s["ci_low"] is None:
                cells.append(f"{s['mean']:.3f}{'':<17}")
            else:
                cells.append(f"{s['mean']:.3f} [{s['ci_low']:.3f},{s['ci_high']:.3f}]".ljust(22))
        text.append(f"{name:<16}{line['n_features']:>5}  " + "  ".join(cells))
    return "\n".join(text)
