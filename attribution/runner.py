"""Attribute every prompt file of a run: skip finished graphs, report failures and carry on."""
from __future__ import annotations

import gc
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from featurestore.errors import UserError

from .prompts import prompt_files, read_prompt_file


@dataclass
class PromptOutcome:
    slug: str
    path: Path
    status: str  # "written", "skipped" or "failed"
    error: str | None = None
    details: dict = field(default_factory=dict)


def slug_for(run_name: str, path: Path) -> str:
    """``{run_name}__{file stem}``, with characters a URL would mangle replaced by '-'."""
    return f"{run_name}__{re.sub(r'[^A-Za-z0-9._-]+', '-', path.stem).strip('-') or 'prompt'}"


def check_run_name(run_name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", run_name or ""):
        raise UserError(f"run name {run_name!r} must be letters, digits, '.', '_' or '-' (it prefixes graph URLs)")


def _error_line(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def attribute_prompts(
    checkpoint: str,
    prompts: str | Path,
    out_dir: str | Path,
    run_name: str,
    *,
    scan: str | None = None,
    store: str | Path | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 16,
    max_feature_nodes: int = 10000,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    injection: str = "encoder-input",
    device: str | None = None,
    dtype: str = "auto",
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> list[PromptOutcome]:
    """One graph per prompt file into ``out_dir`` (and ``store``); returns one outcome per file.

    Finished prompts (their ``{slug}.json`` exists in ``out_dir``) are skipped before torch or the model is loaded,
    so a rerun of a finished run returns at once."""
    for name, value in (("node threshold", node_threshold), ("edge threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{name} must be between 0 and 1 (got {value})")
    check_run_name(run_name)
    files = prompt_files(prompts)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} is a file, not a directory")
    finished = {path for path in files if (out / f"{slug_for(run_name, path)}.json").exists()}
    pending = [path for path in files if path not in finished]
    log(f"{len(files)} prompt file{'s' if len(files) != 1 else ''}: {len(finished)} already in {out}, "
        f"{len(pending)} to attribute")
    if not pending:
        return [_skipped(run_name, path, log) for path in files]

    import torch

    from exporters import graph_json
    from featurestore.modeling import load_model, load_tokenizer

    from . import store_output
    from .api import attribute, check_options

    check_options(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                  max_feature_nodes=max_feature_nodes, injection=injection)
    log(f"loading {checkpoint} ...")
    model, info = load_model(checkpoint, dtype=dtype, device=device)
    tokenizer = load_tokenizer(info.path)
    sink = store_output.StoreSink.open(store, info, out, run_name) if store is not None else None
    if sink is not None:
        log(sink.note or f"store {store}: {len(sink.descriptions)} feature descriptions used as node labels")
    if scan is None:
        scan = sink.scan if sink is not None else run_name
        if sink is None:
            log(f"note: no --scan or --store: metadata.scan is {scan!r}, where the viewer will find no features")
    descriptions = sink.descriptions if sink is not None else None

    outcomes = []
    for path in files:
        slug = slug_for(run_name, path)
        if path in finished or (out / f"{slug}.json").exists():
            outcomes.append(_skipped(run_name, path, log))
            continue
        started = time.perf_counter()
        try:
            prompt = read_prompt_file(path, tokenizer)
            graph = attribute(model, tokenizer, prompt.tokens, target=prompt.target, max_n_logits=max_n_logits,
                              desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                              max_feature_nodes=max_feature_nodes, injection=injection, progress=progress)
            written = graph_json.write(graph, out, slug, scan, node_threshold, edge_threshold, descriptions)
            if sink is not None:
                sink.add(graph, written, slug, node_threshold=node_threshold, edge_threshold=edge_threshold,
                         prompt_file=path.name)
        except Exception as exc:  # one prompt failing must not stop the others
            outcomes.append(PromptOutcome(slug, path, "failed", _error_line(exc)))
            log(f"{slug}: failed: {_error_line(exc)}")
            graph = written = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        details = describe(graph, written, tokenizer, time.perf_counter() - started)
        outcomes.append(PromptOutcome(slug, path, "written", details=details))
        log(f"{slug}: {details['summary']}")
    return outcomes


def _skipped(run_name: str, path: Path, log: Callable[[str], None]) -> PromptOutcome:
    slug = slug_for(run_name, path)
    log(f"{slug}: skipped ({slug}.json exists)")
    return PromptOutcome(slug, path, "skipped")


def describe(graph, written, tokenizer, seconds: float) -> dict:
    """Counts and the target check for the run summary."""
    target = graph.target_token
    top = graph.top_token
    details = {
        "n_tokens": graph.n_pos, "n_active": graph.info["n_active"], "n_feature_rows": graph.n_selected,
        "n_nodes": len(written.nodes), "n_links": len(written.links), "seconds": round(seconds, 2),
        "top_token": tokenizer.decode([top]), "top_probability": float(graph.logit_probabilities[0]),
        "target_token": tokenizer.decode([target]) if target is not None else None,
        "target_probability": graph.info.get("target_probability"), "target_rank": graph.info.get("target_rank"),
        "top_differs": target is not None and target != top,
    }
    summary = (f"{details['n_tokens']} tokens, {details['n_active']} active features, {details['n_feature_rows']} "
               f"feature rows, {details['n_nodes']} nodes, {details['n_links']} links, {seconds:.1f}s")
    if target is not None:
        summary += f"; target {details['target_token']!r} p={details['target_probability']:.3f} (rank {details['target_rank']})"
        if details["top_differs"]:
            summary += f"; model's top prediction {details['top_token']!r} p={details['top_probability']:.3f} differs from the target"
    details["summary"] = summary
    return details
