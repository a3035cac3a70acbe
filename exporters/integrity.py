"""Integrity checks for what the exporters write, reported per feature so a broken entry can be found.

A pack: the index parses, covers layers 0..L-1 contiguously with a file for each and no stray layer files;
offsets start at 0, never decrease, stay within the file and end exactly at its size; every entry's length
prefix matches, it decompresses, parses as strict JSON (no NaN) and has the shape the viewer reads.
A per-feature JSON directory and a graph directory get the same kind of checks.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from featurestore.errors import UserError
from featurestore.ids import cantor, cantor_unpair

INDEX_NAME = "index.json.gz"
_LAYER_FILE = re.compile(r"^layer_(\d+)\.bin$")
_ID_FILE = re.compile(r"^(\d+)\.json$")
_INLINE_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves


@dataclass(frozen=True)
class Problem:
    layer: int | None
    feature: int | None
    message: str

    def __str__(self) -> str:
        if self.layer is None:
            return self.message
        if self.feature is None:
            return f"layer {self.layer}: {self.message}"
        return f"layer {self.layer} feature {self.feature} (id {cantor(self.layer, self.feature)}): {self.message}"


@dataclass
class VerifyReport:
    path: Path
    kind: str  # pack | json | graphs
    checked: int = 0  # entries / files examined
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def strict_json(data: bytes | str):
    """``JSON.parse`` semantics: NaN / Infinity are errors."""
    return json.loads(data, parse_constant=_reject_constant)


def document_problems(document, layer: int | None = None, feature: int | None = None) -> list[str]:
    """What in a feature document would break or mislead the viewer (empty when fine)."""
    if not isinstance(document, dict):
        return ["not a JSON object"]
    groups = document.get("examples_quantiles")
    if not isinstance(groups, list):
        return ["examples_quantiles missing or not a list"]
    problems = []
    for layer_key, expected in (("layer", layer), ("feature", feature)):
        if expected is not None and layer_key in document and document[layer_key] != expected:
            problems.append(f"{layer_key} field is {document[layer_key]!r}, expected {expected}")
    for g, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("examples"), list):
            problems.append(f"examples_quantiles[{g}] has no examples list")
            continue
        if not isinstance(group.get("quantile_name"), str):
            problems.append(f"examples_quantiles[{g}] has no quantile_name")
        for e, example in enumerate(group["examples"]):
            problem = _example_problem(example)
            if problem:
                problems.append(f"examples_quantiles[{g}].examples[{e}]: {problem}")
                break
    return problems


def _example_problem(example) -> str | None:
    if not isinstance(example, dict):
        return "not an object"
    tokens, acts = example.get("tokens"), example.get("tokens_acts_list")
    if not isinstance(tokens, list) or not set(map(type, tokens)) <= {str}:
        return "tokens missing or not a list of strings"
    if not isinstance(acts, list) or len(acts) != len(tokens):
        return "tokens_acts_list missing or not as long as tokens"
    if not set(map(type, acts)) <= {int, float} or not all(map(math.isfinite, acts)):
        return "tokens_acts_list holds a non-number"
    index = example.get("train_token_ind")
    if index is not None and not (isinstance(index, int) and 0 <= index < max(1, len(tokens))):
        return f"train_token_ind {index!r} outside the window"
    return None


# ---- packs ----

def _check_layer(directory: str, layer: int, filename, offsets, n_features: int) -> tuple[int, list[Problem]]:
    """Worker: all checks for one layer file; returns (entries checked, problems)."""
    problems: list[Problem] = []
    if not isinstance(filename, str) or "/" in filename or filename in ("", ".", ".."):
        return 0, [Problem(layer, None, f"index filename {filename!r} is not a plain file name")]
    if not isinstance(offsets, list) or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets):
        return 0, [Problem(layer, None, "index offsets missing or not a list of integers")]
    path = Path(directory) / filename
    if not path.is_file():
        return 0, [Problem(layer, None, f"layer file {filename} is missing")]
    if len(offsets) != n_features + 1:
        problems.append(Problem(layer, None, f"{len(offsets)} offsets where the pack's layers have {n_features + 1}"))
    if offsets and offsets[0] != 0:
        problems.append(Problem(layer, None, f"offsets[0] is {offsets[0]}, not 0"))
    size = path.stat().st_size
    checked = 0
    with open(path, "rb") as handle:
        for feature in range(len(offsets) - 1):
            start, end = offsets[feature], offsets[feature + 1]
            if end < start:
                problems.append(Problem(layer, feature, f"offsets decrease ({start} -> {end})"))
                continue
            if end > size:
                problems.append(Problem(layer, feature, f"entry ends at byte {end}, beyond the file's {size} bytes (truncated?)"))
                continue
            if start == end:
                continue
            handle.seek(start)
            message = _entry_problem(handle.read(end - start), layer, feature)
            checked += 1
            if message:
                problems.append(Problem(layer, feature, message))
    if offsets and offsets[-1] < size:
        problems.append(Problem(layer, None, f"{size - offsets[-1]} bytes after the last entry"))
    return checked, problems


def _entry_problem(raw: bytes, layer: int, feature: int) -> str | None:
    if len(raw) < 4:
        return f"entry of {len(raw)} bytes cannot hold its 4-byte length"
    (length,) = struct.unpack_from("<I", raw)
    if length != len(raw) - 4:
        return f"length prefix says {length} bytes but the entry holds {len(raw) - 4}"
    try:
        document = strict_json(zlib.decompress(raw[4:], wbits=47))
    except zlib.error as exc:
        return f"entry does not decompress ({exc})"
    except (ValueError, UnicodeDecodeError) as exc:
        return f"entry is not valid JSON ({exc})"
    problems = document_problems(document, layer, feature)
    return "; ".join(problems) if problems else None


def verify_pack(directory: str | os.PathLike, workers: int | None = None, n_layers: int | None = None) -> VerifyReport:
    from .pack import parallel_map, resolve_workers

    directory = Path(directory)
    report = VerifyReport(directory, "pack")
    try:
        index = strict_json(gzip.decompress((directory / INDEX_NAME).read_bytes()))
    except FileNotFoundError:
        report.problems.append(Problem(None, None, f"{INDEX_NAME} is missing"))
        return report
    except (OSError, EOFError, ValueError) as exc:
        report.problems.append(Problem(None, None, f"{INDEX_NAME} is not gzip-compressed JSON ({exc})"))
        return report
    if not isinstance(index, dict):
        report.problems.append(Problem(None, None, f"{INDEX_NAME} is not a JSON object"))
        return report
    layers = sorted(int(key) for key in index if key.isdigit())
    if not layers:
        report.problems.append(Problem(None, None, f"{INDEX_NAME} lists no layers"))
        return report
    expected = range(n_layers if n_layers is not None else max(layers) + 1)
    for missing in sorted(set(expected) - set(layers)):
        report.problems.append(Problem(missing, None, "missing from the index"))
    for extra in sorted(set(layers) - set(expected)):
        report.problems.append(Problem(extra, None, f"in the index but the model has {len(expected)} layers"))
    listed = {index[str(layer)].get("filename") for layer in layers if isinstance(index[str(layer)], dict)}
    for name in sorted(os.listdir(directory)):
        if _LAYER_FILE.match(name) and name not in listed:
            report.problems.append(Problem(int(_LAYER_FILE.match(name).group(1)), None, f"{name} exists but the index does not list it"))
    entries = {layer: index[str(layer)] if isinstance(index[str(layer)], dict) else {} for layer in layers}
    n_features = max(len(entry.get("offsets") or [0]) for entry in entries.values()) - 1
    tasks = [(layer, entries[layer].get("filename"), entries[layer].get("offsets")) for layer in layers]
    total = sum((directory / name).stat().st_size for name in os.listdir(directory) if _LAYER_FILE.match(name))
    workers = min(workers or (1 if total < _INLINE_BYTES else resolve_workers(None)), len(tasks))
    for checked, problems in parallel_map(_check_layer_task, tasks, workers, str(directory), n_features):
        report.checked += checked
        report.problems.extend(problems)
    return report


def _check_layer_task(task, directory: str, n_features: int):
    layer, filename, offsets = task
    return _check_layer(directory, layer, filename, offsets, n_features)


# ---- per-feature JSON directories and graph directories ----

def verify_json_dir(directory: str | os.PathLike) -> VerifyReport:
    directory = Path(directory)
    features_dir = directory / "features" if (directory / "features").is_dir() else directory
    report = VerifyReport(directory, "json")
    for name in sorted(os.listdir(features_dir)):
        match = _ID_FILE.match(name)
        if not match:
            continue
        layer, feature = cantor_unpair(int(match.group(1)))
        report.checked += 1
        try:
            document = strict_json((features_dir / name).read_bytes())
        except ValueError as exc:
            report.problems.append(Problem(layer, feature, f"{name} is not valid JSON ({exc})"))
            continue
        for message in document_problems(document, layer, feature):
            report.problems.append(Problem(layer, feature, f"{name}: {message}"))
    metadata = directory / "feature_metadata.json"
    if metadata.is_file():
        try:
            if not isinstance(strict_json(metadata.read_bytes()).get("features"), list):
                report.problems.append(Problem(None, None, "feature_metadata.json has no features list"))
        except (ValueError, AttributeError) as exc:
            report.problems.append(Problem(None, None, f"feature_metadata.json is not a valid JSON object ({exc})"))
    if report.checked == 0 and not metadata.is_file():
        report.problems.append(Problem(None, None, "no {cantor_id}.json files and no feature_metadata.json"))
    return report


def verify_graph_dir(directory: str | os.PathLike) -> VerifyReport:
    directory = Path(directory)
    report = VerifyReport(directory, "graphs")
    try:
        graphs = strict_json((directory / "graph-metadata.json").read_bytes())["graphs"]
        assert isinstance(graphs, list)
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        report.problems.append(Problem(None, None, f"graph-metadata.json has no valid graphs list ({exc})"))
        return report
    for entry in graphs:
        slug = entry.get("slug") if isinstance(entry, dict) else None
        report.checked += 1
        try:
            graph = strict_json((directory / f"{slug}.json").read_bytes())
            missing = [key for key in ("metadata", "qParams", "nodes", "links") if key not in graph]
            if missing:
                report.problems.append(Problem(None, None, f"{slug}.json lacks {', '.join(missing)}"))
        except (OSError, ValueError, TypeError) as exc:
            report.problems.append(Problem(None, None, f"graph {slug!r}: {slug}.json missing or invalid ({exc})"))
    return report


def verify(directory: str | os.PathLike, workers: int | None = None, n_layers: int | None = None) -> VerifyReport:
    """Check a pack, a per-feature JSON directory or a graph directory (chosen by what the directory holds).

    ``n_layers`` (packs only) also catches a pack whose last layers are missing altogether."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a directory")
    if (directory / INDEX_NAME).exists() or any(_LAYER_FILE.match(name) for name in os.listdir(directory)):
        return verify_pack(directory, workers, n_layers)
    if (directory / "graph-metadata.json").exists():
        return verify_graph_dir(directory)
    return verify_json_dir(directory)
