"""The RelP-linearised forward pass: real forward values, a backward that follows the RelP rules.

Rules (Jafari et al., arXiv 2508.21258), written with ``detach`` so forward values are unchanged:
RMSNorm scale frozen (LN-rule), attention softmax frozen (AH-rule), SiLU as ``g * stopgrad(sigmoid(g))``
(Identity-rule), ``gate * up`` split half/half (Half-rule), and the adapter's features as stop-gradient
leaves. Without biases the result is exactly linear: every target equals the sum of its sources'
``input * gradient`` terms, which is what makes the edges of an attribution graph add up.

The same pass can record the frozen coefficients (:class:`Coefficients`): the linear map whose
transpose the fast path applies directly (engine.py), while autograd through this forward is the
slow reference it is tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .architectures import LlamaFamily


@dataclass
class Coefficients:
    """The frozen per-position factors of the linearised model (copy 0), in the model's dtype."""

    norm_in: list[torch.Tensor] = field(default_factory=list)  # (P, d): gamma / rms of input_layernorm
    patterns: list[torch.Tensor] = field(default_factory=list)  # (H, P, P) softmax weights
    norm_mlp: list[torch.Tensor] = field(default_factory=list)  # (P, d): gamma / rms of post_attention_layernorm
    gate: list[torch.Tensor] = field(default_factory=list)  # (P, d_mlp): d(product)/d(gate) = sigmoid(g) * u / 2
    up: list[torch.Tensor] = field(default_factory=list)  # (P, d_mlp): d(product)/d(up) = g * sigmoid(g) / 2
    norm_final: torch.Tensor | None = None  # (P, d)


@dataclass
class Trace:
    """What one linearised forward leaves behind for the backward passes."""

    embeddings: torch.Tensor  # (C, P, d) leaf: the token sources
    layer_inputs: list[torch.Tensor]  # residual entering each layer, (C, P, d)
    feature_inputs: list[torch.Tensor]  # post-attention-norm output = adapter encoder input, (C, P, d)
    feature_leaves: list[torch.Tensor]  # per layer: leaf decoder output (C, P, d), or dense features (C, P, F)
    activations: list[torch.Tensor]  # per layer: features of copy 0, (P, F), no grad
    final: torch.Tensor  # final-norm output = lm_head input, (C, P, d)
    last_logits: torch.Tensor  # (vocab,) float32 at the last position of copy 0
    dense_leaves: bool
    coefficients: Coefficients | None = None


def frozen_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm with its 1/rms factor frozen, so it is linear in ``x`` (LN-rule); also returns that factor."""
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).detach()
    return norm.weight * (xf * scale).to(x.dtype), scale


def norm_coefficient(norm: torch.nn.Module, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (norm.weight.float() * scale[0]).to(dtype)


def linearised_forward(arch: LlamaFamily, tokens: torch.Tensor, *, copies: int = 1, dense_leaves: bool = False,
                       record: bool = False) -> Trace:
    """Run ``tokens`` (P,) through the linearised model.

    ``copies`` > 1 replicates the prompt along the batch (only the slow reference does that).
    The feature leaves are the decoder outputs ``W_dec a`` (d_model wide) unless ``dense_leaves``,
    where they are the dense feature tensors themselves, as the original implementation had them.
    ``record`` keeps the frozen coefficients (run it under ``torch.no_grad()`` when only those are needed).
    """
    coefficients = Coefficients() if record else None
    with torch.no_grad():
        embedded = arch.embed_tokens(tokens[None]).expand(copies, -1, -1).clone()
    embeddings = embedded.requires_grad_(torch.is_grad_enabled())
    dtype = embeddings.dtype
    rope = arch.position_embeddings(embeddings)
    layer_inputs, feature_inputs, leaves, activations = [], [], [], []
    hidden = embeddings
    for i in range(arch.n_layers):
        layer_inputs.append(hidden)
        normed, scale_in = frozen_rms_norm(arch.input_norm(i), hidden)
        with torch.no_grad():
            pattern = arch.attention_pattern(i, normed, rope)  # AH-rule: no gradient through Q or K
        hidden = hidden + arch.attention_output(i, torch.matmul(pattern, arch.values(i, normed)))
        mlp_in, scale_mlp = frozen_rms_norm(arch.feature_input_norm(i), hidden)
        feature_inputs.append(mlp_in)
        gate, up = arch.mlp_gate_up(i, mlp_in)
        sigmoid = torch.sigmoid(gate).detach()  # Identity-rule: silu(g) = g * stopgrad(sigmoid(g))
        product = gate * sigmoid * up
        mlp_out = arch.mlp_down(i, 0.5 * product + 0.5 * product.detach())  # Half-rule
        decoder = arch.decoder(i)
        with torch.no_grad():
            acts = torch.relu(arch.encoder(i)(mlp_in))
        activations.append(acts[0])
        if dense_leaves:
            leaf = acts.clone().requires_grad_(torch.is_grad_enabled())
            decoded = F.linear(leaf, decoder.weight)
        else:
            with torch.no_grad():
                decoded = F.linear(acts, decoder.weight)
            leaf = decoded.requires_grad_(torch.is_grad_enabled())
        leaves.append(leaf)
        mlp_out = mlp_out + decoded
        if decoder.bias is not None:
            mlp_out = mlp_out + decoder.bias
        hidden = hidden + mlp_out
        if coefficients is not None:
            with torch.no_grad():
                coefficients.norm_in.append(norm_coefficient(arch.input_norm(i), scale_in, dtype))
                coefficients.patterns.append(pattern[0])
                coefficients.norm_mlp.append(norm_coefficient(arch.feature_input_norm(i), scale_mlp, dtype))
                coefficients.gate.append((0.5 * sigmoid[0] * up[0]).detach())
                coefficients.up.append((0.5 * gate[0] * sigmoid[0]).detach())
    final, scale_final = frozen_rms_norm(arch.final_norm, hidden)
    if coefficients is not None:
        coefficients.norm_final = norm_coefficient(arch.final_norm, scale_final, dtype)
    with torch.no_grad():
        last_logits = F.linear(final[0, -1], arch.unembed).float()
    return Trace(embeddings, layer_inputs, feature_inputs, leaves, activations, final, last_logits, dense_leaves,
                 coefficients)
