"""A slow, obviously-correct reference: the original implementation's structure, kept for tests and benchmarks.

The prompt is replicated ``batch_size`` times, each copy's backward carries one target, the dense
feature tensors are the gradient leaves, and every edge is read with a Python loop over active
features and positions, as nathanhu0/transcoder-adapters did. With ``batch_size=1`` it is a plain
single-target backward per row.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .api import frozen_parameters
from .architectures import architecture_for
from .engine import ActiveFeatures, find_active_features
from .linearised import linearised_forward


def reference_rows(
    model: torch.nn.Module,
    tokens: Sequence[int],
    targets: Sequence[tuple[int, int, torch.Tensor]],
    *,
    injection: str = "encoder-input",
    batch_size: int = 1,
    first_position: int = 0,
) -> tuple[torch.Tensor, ActiveFeatures]:
    """Edge rows (T, n_active + P) for targets ``(site, position, vector)``; site ``n_layers`` = final norm.

    Active features before ``first_position`` are not sources (1 = BOS excluded, as ``attribute`` does).
    """
    arch = architecture_for(model)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=arch.unembed.device)
    with frozen_parameters(model), torch.enable_grad():
        trace = linearised_forward(arch, ids, copies=batch_size, dense_leaves=True)
        active = find_active_features(trace, first_position)
        reads = trace.feature_inputs if injection == "encoder-input" else trace.layer_inputs
        sites = [*reads, trace.final]
        leaves = [trace.embeddings, *trace.feature_leaves]
        n_active, n_pos = len(active), len(ids)
        rows = torch.zeros(len(targets), n_active + n_pos, dtype=torch.float32)
        for start in range(0, len(targets), batch_size):
            batch = targets[start:start + batch_size]
            for leaf in leaves:
                leaf.grad = None
            objective = sum((sites[site][slot, pos] * vector.to(sites[site])).sum()
                            for slot, (site, pos, vector) in enumerate(batch))
            objective.backward(retain_graph=True)
            block = rows[start:start + len(batch)]
            for s in range(n_active):  # one read per active feature for all slots, as the original did
                layer, pos, feature = int(active.layers[s]), int(active.positions[s]), int(active.features[s])
                grad = trace.feature_leaves[layer].grad
                if grad is not None:
                    block[:, s] = grad[:len(batch), pos, feature].float().cpu() * active.values[s]
            if trace.embeddings.grad is not None:
                for pos in range(n_pos):
                    embedding = trace.embeddings[:len(batch), pos].detach().float()
                    block[:, n_active + pos] = (trace.embeddings.grad[:len(batch), pos].float() * embedding).sum(-1).cpu()
    return rows, active
