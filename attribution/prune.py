"""Pruning on the compact ``[features | tokens | logits]`` matrix.

Same rule as circuit-tracer's ``prune_graph`` (which needs the ``n_layers * n_pos`` zero error block):
node influence = sum of powers of the row-normalised |A| seen from the logits, keep the nodes holding
``node_threshold`` of it, then the edges holding ``edge_threshold`` of the edge scores of the pruned
graph, then drop features left without in- or out-edges until nothing changes. Zero rows and columns
never change any other node's result, so dropping the error block gives the same masks and scores.
Memory: the adjacency plus one N x N float working matrix and N x N boolean mask; thresholds sort only
the non-zero scores.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class PruneResult(NamedTuple):
    node_mask: torch.Tensor  # (N,) bool
    edge_mask: torch.Tensor  # (N, N) bool, [target, source]
    cumulative_scores: torch.Tensor  # (N,) share of total influence at the node's rank: smaller = more important


def _normalise_rows_(matrix: torch.Tensor) -> torch.Tensor:
    matrix.abs_()
    matrix /= matrix.sum(dim=1, keepdim=True).clamp(min=1e-10)
    return matrix


def _influence(normalised: torch.Tensor, weights: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """sum_{n>=1} weights @ normalised^n; the graph is acyclic, so the powers reach exactly zero."""
    current = weights @ normalised
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalised
        total += current
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (is the graph acyclic?)")


def score_threshold(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The smallest score among the top scores holding ``share`` of the total (ties included).

    Zeros sort last and add nothing to the running share, so only non-zero scores are sorted; a share
    that the non-zero scores never reach lands on a zero, as it would in the full sort.
    """
    flat = scores.reshape(-1)
    nonzero = flat[flat != 0]
    if nonzero.numel() == 0:
        return torch.zeros((), dtype=scores.dtype, device=scores.device)
    ordered = torch.sort(nonzero, descending=True).values
    running = torch.cumsum(ordered, dim=0) / ordered.sum()
    index = int(torch.searchsorted(running, share).item())
    if index < len(ordered):
        return ordered[index]
    return torch.zeros((), dtype=scores.dtype, device=scores.device) if nonzero.numel() < flat.numel() else ordered[-1]


def prune(adjacency: torch.Tensor, logit_probabilities: torch.Tensor, n_features: int, n_tokens: int,
          node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
    """Prune a compact adjacency laid out as ``[n_features | n_tokens | n_logits]``."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (got {value})")
    size, n_logits = adjacency.shape[0], len(logit_probabilities)
    weights = torch.zeros(size, dtype=adjacency.dtype, device=adjacency.device)
    weights[-n_logits:] = logit_probabilities.to(weights)

    working = _normalise_rows_(adjacency.clone())
    node_influence = _influence(working, weights)
    node_mask = node_influence >= score_threshold(node_influence, node_threshold)
    node_mask[-n_logits - n_tokens:] = True

    working.copy_(adjacency)
    working[~node_mask] = 0
    working[:, ~node_mask] = 0
    _normalise_rows_(working)
    working *= (_influence(working, weights) + weights)[:, None]  # edge scores, in place
    edge_mask = working >= score_threshold(working, edge_threshold)
    del working

    inner = size - n_logits - n_tokens  # feature nodes (circuit-tracer's features and errors)
    while True:
        before = node_mask.clone()
        node_mask[:inner] &= edge_mask[:, :inner].any(0)
        node_mask[:n_features] &= edge_mask[:n_features].any(1)
        if torch.equal(before, node_mask):
            break
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False

    ordered, order = torch.sort(node_influence, descending=True, stable=True)
    total = ordered.sum()
    cumulative = torch.cumsum(ordered, dim=0) / total if total > 0 else torch.ones_like(ordered)
    scores = torch.empty_like(node_influence)
    scores[order] = cumulative
    return PruneResult(node_mask, edge_mask, scores)
