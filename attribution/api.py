"""``attribute(model, tokenizer, prompt) -> Graph``: RelP attribution of one prompt."""
from __future__ import annotations

import contextlib
import time
from typing import Sequence

import torch

from featurestore.errors import UserError

from .architectures import architecture_for
from .engine import INJECTIONS, RowComputer, compute_edge_rows, find_active_features
from .graph import Graph, compact_adjacency
from .linearised import linearised_forward
from .prompts import encode_prompt
from .targets import logit_targets


@contextlib.contextmanager
def frozen_parameters(model: torch.nn.Module):
    """No weight gradients are computed or accumulated during attribution; the caller's flags come back after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for param, _ in flags:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def check_options(*, max_n_logits: int, desired_logit_prob: float, batch_size: int, max_feature_nodes: int,
                  injection: str) -> None:
    if max_feature_nodes < 1:
        raise UserError(f"max_feature_nodes (--max-feature-nodes) must be at least 1 (got {max_feature_nodes})")
    if batch_size < 1:
        raise UserError(f"batch_size (--batch-size) must be at least 1 (got {batch_size})")
    if max_n_logits < 1:
        raise UserError(f"max_n_logits (--max-n-logits) must be at least 1 (got {max_n_logits})")
    if not 0.0 < desired_logit_prob <= 1.0:
        raise UserError(f"desired_logit_prob (--desired-logit-prob) must be in (0, 1] (got {desired_logit_prob})")
    if injection not in INJECTIONS:
        raise UserError(f"injection must be one of {', '.join(INJECTIONS)} (got {injection!r})")


def attribute(
    model: torch.nn.Module,
    tokenizer,
    prompt: str | Sequence[int],
    *,
    target: int | None = None,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    batch_size: int = 16,
    max_feature_nodes: int = 10000,
    injection: str = "encoder-input",
    exclude_bos: bool = True,
    update_interval: int = 4,
    progress: bool = False,
) -> Graph:
    """Attribute the next-token prediction after ``prompt`` (text or token ids; BOS is prepended if missing).

    ``target`` (a token id) is always among the logit nodes, even outside the top-p set.
    ``injection="encoder-input"`` reads each feature where its encoder does (after the layer's attention
    and post-attention norm); ``"layer-input"`` reproduces the original implementation, which read the
    residual entering the layer. With ``exclude_bos`` the features at a special first token are left out
    (neither nodes nor sources) and the BOS token's out-edges are zeroed.
    """
    check_options(max_n_logits=max_n_logits, desired_logit_prob=desired_logit_prob, batch_size=batch_size,
                  max_feature_nodes=max_feature_nodes, injection=injection)
    arch = architecture_for(model)
    ids, has_bos = encode_prompt(tokenizer, prompt)
    if target is not None and not 0 <= int(target) < arch.unembed.shape[0]:
        raise UserError(f"target token id {target} is outside the vocabulary")
    device = arch.unembed.device
    tokens = torch.tensor(ids, dtype=torch.long, device=device)
    started = time.perf_counter()
    with frozen_parameters(model), torch.no_grad():  # the backward is written out: no autograd graph needed
        trace = linearised_forward(arch, tokens, record=True)
        drop_bos = exclude_bos and has_bos
        active = find_active_features(trace, first_position=1 if drop_bos else 0)  # BOS features: no nodes, no edges
        logits = logit_targets(trace.last_logits, arch.unembed, max_n_logits=max_n_logits,
                               desired_logit_prob=desired_logit_prob, required_token=target)
        ranking = {}
        if target is not None:
            probs = torch.softmax(trace.last_logits, dim=-1)
            ranking = {"target_probability": float(probs[int(target)]),
                       "target_rank": int((probs > probs[int(target)]).sum()) + 1}
        computer = RowComputer(arch, trace, active, injection)
        del trace  # the computer keeps only the frozen coefficients and the embeddings
        edges = compute_edge_rows(computer, logits.vectors, logits.probabilities,
                                  max_feature_nodes=max_feature_nodes, batch_size=batch_size,
                                  update_interval=update_interval, progress=progress)
        del computer
    selected, adjacency = compact_adjacency(edges, active, len(ids), len(logits.tokens), zero_bos_token=drop_bos)
    active_table = torch.stack([active.layers, active.positions, active.features], dim=1)
    return Graph(
        prompt=tokenizer.decode(ids),
        input_tokens=tokens.cpu(),
        token_strings=[tokenizer.decode([t]) for t in ids],
        active_features=active_table,
        activation_values=active.values,
        selected_features=selected,
        adjacency=adjacency,
        logit_tokens=logits.tokens,
        logit_strings=[tokenizer.decode([t]) for t in logits.tokens.tolist()],
        logit_probabilities=logits.probabilities,
        n_layers=arch.n_layers,
        vocab_size=int(arch.unembed.shape[0]),
        injection=injection,
        bos_excluded=drop_bos,
        target_token=None if target is None else int(target),
        model_name=str(getattr(model.config, "name_or_path", "") or ""),
        info={"n_active": len(active),
              "seconds": time.perf_counter() - started, **ranking},
    )
