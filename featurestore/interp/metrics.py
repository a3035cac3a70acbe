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


# ---- per-feature intervals and the other scorers' metrics

def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """Probability that a random positive scores above a random negative (ties count one half); None without both."""
    pos = [s for l, s in zip(labels, scores) if l]
    neg = [s for l, s in zip(labels, scores) if not l]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _stratified(labels: list[bool], n_resamples: int, seed: int):
    """Index resamples that keep the number of positives and negatives (the design of the test set)."""
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(np.asarray(labels, dtype=bool))
    neg = np.flatnonzero(~np.asarray(labels, dtype=bool))
    return pos[rng.integers(0, pos.size, size=(n_resamples, pos.size))], neg[rng.integers(0, neg.size, size=(n_resamples, neg.size))]


def auroc_interval(labels: list[bool], scores: list[float], n_resamples: int = 2000, confidence: float = 0.95,
                   seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of AUROC under a stratified bootstrap of the items."""
    labels = [bool(l) for l in labels]
    if not any(labels) or all(labels):
        return None, None
    values = np.asarray(scores, dtype=float)
    pos_idx, neg_idx = _stratified(labels, n_resamples, seed)
    p, n = values[pos_idx][:, :, None], values[neg_idx][:, None, :]
    aucs = ((p > n) + 0.5 * (p == n)).mean(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(aucs, [tail, 1 - tail])
    return float(low), float(high)


def balanced_accuracy_interval(tp: int, fn: int, tn: int, fp: int, n_resamples: int = 2000, confidence: float = 0.95,
                               seed: int = 0) -> tuple[float | None, float | None]:
    """Percentile interval of balanced accuracy under a stratified bootstrap of the items (positives and
    negatives resampled separately, so the counts of each stay as designed). Needs both classes."""
    positives, negatives = tp + fn, tn + fp
    if not positives or not negatives:
        return None, None
    rng = np.random.default_rng(seed)
    tpr = rng.binomial(positives, tp / positives, n_resamples) / positives
    tnr = rng.binomial(negatives, tn / negatives, n_resamples) / negatives
    tail = (1 - confidence) / 2
    low, high = np.quantile((tpr + tnr) / 2, [tail, 1 - tail])
    return float(low), float(high)


SCORER_METRICS = {"detection": METRICS, "fuzzing": METRICS, "embedding": ("auroc",)}


def summarize_scorers(rows: list[dict], seed: int = 0) -> list[dict]:
    """Like ``summarize`` for rows that carry a ``scorer`` (detection rows may omit it): one line per
    (scorer, condition, control) with the mean and bootstrap CI over features of each of the scorer's metrics."""
    groups: dict[tuple[str, str, bool], list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault((row.get("scorer") or "detection", row["condition"], bool(row["control"])), []).append(row)
    order = {name: i for i, name in enumerate(SCORER_METRICS)}
    out = []
    for (scorer, condition, control), members in sorted(groups.items(),
                                                         key=lambda kv: (order.get(kv[0][0], 9), kv[0][2], kv[0][1])):
        line = {"scorer": scorer, "condition": condition, "control": control, "n_features": len(members)}
        for metric in SCORER_METRICS.get(scorer, METRICS):
            line[metric] = bootstrap_mean([m[metric] for m in members], seed=seed)
        out.append(line)
    return out


def format_scorer_summary(lines: list[dict]) -> str:
    """Mean [95% CI] over features of each scorer's headline (balanced accuracy, or AUROC for embedding)."""
    if not lines:
        return "no scored features"
    text = [f"{'scorer':<11}{'condition':<16}{'n':>5}  headline metric, mean [95% CI over features]"]
    for line in lines:
        metric = "auroc" if line["scorer"] == "embedding" else "balanced_accuracy"
        s = line[metric]
        value = "-" if s["mean"] is None else (f"{s['mean']:.3f}" if s["ci_low"] is None else
                                               f"{s['mean']:.3f} [{s['ci_low']:.3f},{s['ci_high']:.3f}]")
        name = ("control " if line["control"] else "") + line["condition"]
        text.append(f"{line['scorer']:<11}{name:<16}{line['n_features']:>5}  {metric} {value}")
    return "\n".join(text)
