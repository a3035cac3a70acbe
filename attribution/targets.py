"""Which logits a graph explains, and the readout vector of every target row."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LogitTargets:
    tokens: torch.Tensor  # (k,) vocabulary ids, most probable first; a forced target is appended last
    probabilities: torch.Tensor  # (k,) softmax probabilities, not renormalised
    vectors: torch.Tensor  # (k, d_model) demeaned unembedding rows


def salient_logits(last_logits: torch.Tensor, max_n_logits: int, desired_logit_prob: float) -> torch.Tensor:
    """The smallest most-probable prefix whose probability reaches ``desired_logit_prob``, capped at ``max_n_logits``."""
    probs = torch.softmax(last_logits.float(), dim=-1)
    top = torch.topk(probs, min(max_n_logits, probs.numel()))
    cutoff = int(torch.searchsorted(torch.cumsum(top.values, 0), torch.tensor(desired_logit_prob)).item()) + 1
    return top.indices[:cutoff]


def logit_targets(
    last_logits: torch.Tensor,
    unembed: torch.Tensor,
    *,
    max_n_logits: int,
    desired_logit_prob: float,
    required_token: int | None = None,
) -> LogitTargets:
    """Salient logits plus ``required_token`` (the prompt file's target) if it is not among them.

    A logit's readout is its unembedding row minus the vocabulary mean, so the target value is the
    logit minus the mean logit, which is invariant to a shift of all logits (as in circuit-tracer).
    """
    tokens = salient_logits(last_logits, max_n_logits, desired_logit_prob)
    if required_token is not None and not bool((tokens == required_token).any()):
        tokens = torch.cat([tokens, torch.tensor([required_token], device=tokens.device)])
    probs = torch.softmax(last_logits.float(), dim=-1)[tokens]
    vectors = unembed[tokens.to(unembed.device)].float() - unembed.mean(0, keepdim=True, dtype=torch.float32)
    return LogitTargets(tokens.long().cpu(), probs.cpu(), vectors)
