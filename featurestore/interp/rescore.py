"""Descriptions to re-score without paying for explanations again: from an earlier run, or from a JSON file.

A file is read in the original auto-interp output format (``{"metadata": {"model", ...}, "features":
[{"layer", "feature", "description", ...}]}``, as ``export autointerp`` also writes). Each description
keeps who wrote it: the copied explanation row carries the original explainer model and endpoint
(``imported`` for a file), with no request made.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .tables import read_rows


@dataclass
class Descriptions:
    """(layer, feature) -> explanation row fields to copy; ``origin`` names where they come from."""

    origin: str
    rows: dict[tuple[int, int], dict] = field(default_factory=dict)

    def digest(self) -> str:
        blob = json.dumps(sorted((k, r["description"]) for k, r in self.rows.items()))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def from_run(root, run_id: str) -> Descriptions:
    """The latest successful explanation per feature of an earlier run of this store."""
    latest: dict[tuple[int, int], dict] = {}
    for row in read_rows(root, "explanations", run_id):
        latest[(row["layer"], row["feature"])] = row
    rows = {k: {"description": r["description"], "reasoning": r["reasoning"], "judge_model": r["judge_model"],
                "base_url_host": r["base_url_host"], "explain_examples": r["explain_examples"],
                "n_examples": r["n_examples"], "activation_freq": r["activation_freq"]}
            for k, r in latest.items() if r["status"] == "ok"}
    if not rows:
        raise UserError(f"run {run_id!r} has no successful explanations in {root}")
    return Descriptions(f"run:{run_id}", rows)


def from_file(path: str | Path) -> Descriptions:
    """Descriptions from a JSON file in the original auto-interp output format; every row is checked."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read descriptions from {path}: {exc}") from None
    features = document.get("features") if isinstance(document, dict) else None
    if not isinstance(features, list):
        raise UserError(f"{path} is not an auto-interp file: no \"features\" list")
    model = (document.get("metadata") or {}).get("model") or "unknown"
    rows: dict[tuple[int, int], dict] = {}
    for i, entry in enumerate(features):
        layer, feature = (entry.get("layer"), entry.get("feature")) if isinstance(entry, dict) else (None, None)
        description = entry.get("description") if isinstance(entry, dict) else None
        if not isinstance(layer, int) or not isinstance(feature, int) or isinstance(layer, bool) or isinstance(feature, bool):
            raise UserError(f"{path}: features[{i}] has no integer layer and feature")
        if not isinstance(description, str) or not description.strip():
            raise UserError(f"{path}: features[{i}] (L{layer}F{feature}) has no description")
        if (layer, feature) in rows:
            raise UserError(f"{path}: L{layer}F{feature} is listed twice")
        rows[(layer, feature)] = {"description": description.strip(), "reasoning": entry.get("reasoning") or "",
                                  "judge_model": str(model), "base_url_host": "imported", "explain_examples": None,
                                  "n_examples": None, "activation_freq": entry.get("activation_freq")}
    if not rows:
        raise UserError(f"{path} lists no features")
    return Descriptions(f"file:{path.name}", rows)


def resolve(root, spec: str) -> Descriptions:
    """``spec``: an existing JSON file, else a run id of this store."""
    if spec.endswith(".json") or Path(spec).is_file():
        return from_file(spec)
    return from_run(root, spec)
