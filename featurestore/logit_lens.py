"""Logit lens per unit: the top and bottom vocabulary entries of ``lm_head.weight @ direction``.

For a transcoder feature the direction is its decoder column (``transcoder_dec.weight[:, f]``), for an MLP
neuron its ``down_proj`` column. As in the original: no final norm, no demeaning. Computed in blocks of
units so the (vocab x units) score matrix never exists whole.
"""
from __future__ import annotations

import pyarrow as pa
import torch

from .schema import LOGIT_LENS

TOP_K = 10


@torch.no_grad()
def logit_lens_table(unembed: torch.Tensor, directions: torch.Tensor, unit_ids: list[int], k: int = TOP_K,
                     block: int = 1024) -> pa.Table:
    """``unembed`` (V, d), ``directions`` (d, n_units) → rows (feature, side, rank, token_id, value)."""
    features, sides, ranks, token_ids, values = [], [], [], [], []
    k = min(k, unembed.shape[0])
    ids = torch.as_tensor(unit_ids, dtype=torch.int32)
    for start in range(0, directions.shape[1], block):
        scores = unembed.float() @ directions[:, start:start + block].float()  # (V, b)
        for side, largest in (("top", True), ("bottom", False)):
            vals, toks = scores.topk(k, dim=0, largest=largest)  # (k, b)
            n = vals.shape[1]
            features.append(ids[start:start + n].repeat(k))
            ranks.append(torch.arange(k, dtype=torch.int16).repeat_interleave(n))
            token_ids.append(toks.reshape(-1).to(torch.int32).cpu())
            values.append(vals.reshape(-1).cpu())
            sides.extend([side] * (k * n))
    return pa.table({
        "feature": torch.cat(features).numpy(),
        "side": sides,
        "rank": torch.cat(ranks).numpy(),
        "token_id": torch.cat(token_ids).numpy(),
        "value": torch.cat(values).numpy(),
    }, schema=LOGIT_LENS)


def transcoder_directions(model, layer: int) -> torch.Tensor:
    return model.model.layers[layer].mlp.transcoder_dec.weight  # (d, n_features)


def neuron_directions(model, layer: int, neurons: list[int]) -> torch.Tensor:
    weight = model.model.layers[layer].mlp.down_proj.weight  # (d, d_mlp)
    return weight[:, torch.as_tensor(neurons, device=weight.device)]
