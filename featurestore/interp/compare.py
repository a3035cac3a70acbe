"""Per-feature scores of every scorer side by side, each with its 95% interval over the feature's items.

One row per feature of an auto-interp run: the description, then per scorer and condition the headline
(balanced accuracy for detection and fuzzing, AUROC for embedding) with ``ci_low``/``ci_high``, and F1 for the
chat scorers. Detection intervals come from the stored confusion counts (stratified bootstrap, seeded), so
old runs get them too. Missing scores (not run, skipped, failed) are null here; ``export autointerp`` says
how it writes them.
"""
from __future__ import annotations

import polars as pl

from ..errors import UserError
from .metrics import balanced_accuracy_interval
from .tables import latest_run, read_rows

CONDITIONS = ("top", "lower")


def headline_rows(root, run_id: str) -> dict[tuple[int, int], dict]:
    """(layer, feature) -> {"<scorer>_<condition>_<metric>": value} from the ok, non-control rows of a run."""
    out: dict[tuple[int, int], dict] = {}
    latest: dict[tuple, dict] = {}
    for row in read_rows(root, "detection_scores", run_id):
        latest[(row["layer"], row["feature"], "detection", row["condition"], row["control"])] = row
    for row in read_rows(root, "scorer_scores", run_id):
        latest[(row["layer"], row["feature"], row["scorer"], row["condition"], row["control"])] = row
    for (layer, feature, scorer, condition, control), row in sorted(latest.items(), key=lambda kv: str(kv[0])):
        if control or row["status"] != "ok":
            continue
        target = out.setdefault((layer, feature), {})
        prefix = f"{scorer}_{condition}"
        if scorer == "embedding":
            target[f"{prefix}_auroc"] = row["auroc"]
            target[f"{prefix}_ci_low"], target[f"{prefix}_ci_high"] = row["ci_low"], row["ci_high"]
            continue
        target[f"{prefix}_balanced_accuracy"] = row["balanced_accuracy"]
        if scorer == "detection":
            low, high = balanced_accuracy_interval(row["tp"], row["fn"], row["tn"], row["fp"])
        else:
            low, high = row["ci_low"], row["ci_high"]
        target[f"{prefix}_ci_low"], target[f"{prefix}_ci_high"] = low, high
        target[f"{prefix}_f1"] = row["f1"]
    return out


def feature_scores(store, run_id: str | None = None) -> pl.DataFrame:
    """Side-by-side per-feature scores of an auto-interp run (default: the latest one)."""
    if run_id is None:
        run = latest_run(store.path, "autointerp")
        if run is None:
            raise UserError(f"no autointerp run in {store.path}: run `featurestore autointerp` first")
        run_id = run["run_id"]
    descriptions: dict[tuple[int, int], str] = {}
    for row in read_rows(store.path, "explanations", run_id, columns="layer, feature, status, description, created_at"):
        if row["status"] == "ok":
            descriptions[(row["layer"], row["feature"])] = row["description"]
    if not descriptions:
        raise UserError(f"run {run_id!r} has no described features in {store.path}")
    scores = headline_rows(store.path, run_id)
    columns: list[str] = []
    for values in scores.values():
        columns.extend(c for c in values if c not in columns)
    order = {name: i for i, name in enumerate(("detection", "fuzzing", "embedding"))}
    columns.sort(key=lambda c: (order.get(c.split("_")[0], 9), CONDITIONS.index(c.split("_")[1])
                                if c.split("_")[1] in CONDITIONS else 9, c))
    rows = [{"layer": l, "feature": f, "description": d, **{c: scores.get((l, f), {}).get(c) for c in columns}}
            for (l, f), d in sorted(descriptions.items())]
    schema = {"layer": pl.Int32, "feature": pl.Int32, "description": pl.Utf8, **{c: pl.Float64 for c in columns}}
    return pl.DataFrame(rows, schema=schema, orient="row")


def format_feature_scores(table: pl.DataFrame) -> str:
    """A text table: one line per feature, one cell per scorer and condition (headline [95% CI]), then the description."""
    groups = []
    for column in table.columns:
        for suffix in ("_balanced_accuracy", "_auroc"):
            if column.endswith(suffix):
                groups.append((column[: -len(suffix)], column))
    header = f"{'feature':<12}" + "".join(f"{g + (' auroc' if c.endswith('auroc') else ' bal.acc'):<26}" for g, c in groups)
    lines = [header + "description"]
    for row in table.iter_rows(named=True):
        cells = []
        for group, column in groups:
            value, low, high = row[column], row.get(f"{group}_ci_low"), row.get(f"{group}_ci_high")
            cell = "-" if value is None else f"{value:.3f}" + ("" if low is None else f" [{low:.2f},{high:.2f}]")
            cells.append(f"{cell:<26}")
        lines.append(f"{'L%dF%d' % (row['layer'], row['feature']):<12}" + "".join(cells) + row["description"])
    return "\n".join(lines)
