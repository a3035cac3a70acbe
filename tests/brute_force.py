"""Slow, obviously-correct references: dense activations one sequence at a time with plain torch."""
from __future__ import annotations

import numpy as np
import torch

from featurestore.data import adds_special_tokens, format_text, open_dataset
from featurestore.modeling import load_model, load_tokenizer


def dense_run(model_dir, data_path, fmt="deepseek", max_length=10000, neurons: dict | None = None):
    """Per sequence: token ids and, per layer, the dense (T, n_features) adapter activations
    (or, with ``neurons``, the dense (T, n) down_proj inputs of the sampled neurons)."""
    net, _ = load_model(str(model_dir), dtype="float32", device="cpu", require_adapter=neurons is None)
    tok = load_tokenizer(model_dir)
    captured = {}

    def hook(layer):
        def fn(module, args):
            x = args[0][0]
            if neurons is None:
                captured[layer] = torch.relu(x @ module.transcoder_enc.weight.T + module.transcoder_enc.bias).numpy()
            else:
                h = module.act_fn(module.gate_proj(x)) * module.up_proj(x)
                captured[layer] = h[:, neurons[layer]].numpy()
        return fn

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(net.model.layers)]
    out = {}
    dataset = open_dataset(str(data_path))
    for row in dataset.rows(0, len(dataset)):
        ids = tok(format_text(row, fmt, tok), add_special_tokens=adds_special_tokens(fmt))["input_ids"][:max_length]
        captured.clear()
        with torch.no_grad():
            net(torch.tensor([ids]))
        out[row.row_index] = (np.asarray(ids), {k: v.copy() for k, v in captured.items()})
    for h in handles:
        h.remove()
    return out


def nonzero_rows(dense) -> dict[int, np.ndarray]:
    """Per layer: array of (feature, seq_id, pos, act) rows of every non-zero activation, sorted."""
    per_layer: dict[int, list] = {}
    for seq_id, (_, layers) in dense.items():
        for layer, acts in layers.items():
            pos, feat = np.nonzero(acts)
            per_layer.setdefault(layer, []).append(np.stack([feat, np.full_like(pos, seq_id), pos, acts[pos, feat]], 1))
    return {layer: _sorted(np.concatenate(parts)) for layer, parts in per_layer.items()}


def _sorted(rows: np.ndarray) -> np.ndarray:
    order = np.lexsort((rows[:, 2], rows[:, 1], rows[:, 0]))
    return rows[order]
