"""Where a Llama-family decoder keeps its parts, and how its attention pattern is computed.

Everything the RelP forward needs to know about one architecture lives in :class:`LlamaFamily`: the
module names of the norms, attention, MLP and adapter, and the (frozen) attention-pattern computation.
Qwen2 uses it as is. Adding Llama means registering ``"llama": LlamaFamily`` once a Llama model class
with the same adapter exists; Qwen3 means a subclass whose :meth:`LlamaFamily.queries_keys` applies
``self_attn.q_norm`` / ``k_norm`` before the rotary embedding, registered under ``"qwen3"``.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from featurestore.errors import UserError


class LlamaFamily:
    """A decoder of ``model.model.{embed_tokens, layers, norm, rotary_emb}`` + ``lm_head`` with RMSNorm,
    rotary GQA attention, a SwiGLU MLP and a transcoder adapter (``transcoder_enc``/``transcoder_dec``) on it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        inner = model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = list(inner.layers)
        self.final_norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.unembed = model.lm_head.weight  # (vocab, d_model)
        self.n_layers = len(self.layers)
        self.d_model = self.config.hidden_size
        if getattr(self.config, "hidden_act", "silu") != "silu":
            raise UserError(f"RelP attribution supports SiLU MLPs only (this model uses {self.config.hidden_act})")
        for i, layer in enumerate(self.layers):
            if not hasattr(layer.mlp, "transcoder_enc"):
                raise UserError(f"layer {i} has no transcoder adapter: attribution needs a model with adapters")
        self.n_features = self.layers[0].mlp.transcoder_enc.out_features

    # --- parts -------------------------------------------------------------------------------
    def input_norm(self, i: int) -> nn.Module:
        return self.layers[i].input_layernorm

    def feature_input_norm(self, i: int) -> nn.Module:
        """The norm whose output is both the MLP input and the adapter encoder's input."""
        return self.layers[i].post_attention_layernorm

    def encoder(self, i: int) -> nn.Linear:
        return self.layers[i].mlp.transcoder_enc

    def decoder(self, i: int) -> nn.Linear:
        return self.layers[i].mlp.transcoder_dec

    # --- attention ---------------------------------------------------------------------------
    def position_embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        return self.rotary_emb(x, positions)

    def queries_keys(self, i: int, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries (B, H, P, dh) and keys (B, H_kv, P, dh) after the rotary embedding."""
        attn = self.layers[i].self_attn
        shape = (*x.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(x).view(shape).transpose(1, 2)
        k = attn.k_proj(x).view(shape).transpose(1, 2)
        cos, sin = rope
        return apply_rotary_pos_emb(q, k, cos, sin)

    def attention_pattern(self, i: int, x: torch.Tensor, rope) -> torch.Tensor:
        """Softmax weights (B, H, P, P) for the normed layer input ``x``; RelP keeps them frozen."""
        attn = self.layers[i].self_attn
        q, k = self.queries_keys(i, x, rope)
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
        n = x.shape[1]
        query = torch.arange(n, device=x.device)[:, None]
        key = torch.arange(n, device=x.device)[None, :]
        hidden = key > query
        window = getattr(attn, "sliding_window", None)
        if window:
            hidden = hidden | (query - key >= window)
        scores = scores.masked_fill(hidden, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(x.dtype)

    def values(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Values (B, H, P, dh), key-value heads repeated for grouped-query attention."""
        attn = self.layers[i].self_attn
        v = attn.v_proj(x).view(*x.shape[:-1], -1, attn.head_dim).transpose(1, 2)
        return v.repeat_interleave(attn.num_key_value_groups, dim=1)

    def attention_output(self, i: int, mixed: torch.Tensor) -> torch.Tensor:
        """``o_proj`` of the per-head mixtures (B, H, P, dh) -> (B, P, d_model)."""
        batch, _, n, _ = mixed.shape
        return self.layers[i].self_attn.o_proj(mixed.transpose(1, 2).reshape(batch, n, -1))

    def attention_transpose(self, i: int, pattern: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of ``x -> attention_output(pattern @ values(x))`` without the value bias: (B, n, d) -> (B, n, d).

        The batch rides along the head dimension's columns, so the frozen (H, n, n) pattern is never copied per target.
        """
        attn = self.layers[i].self_attn
        batch, n, _ = grad.shape
        heads, groups, head_dim = pattern.shape[0], attn.num_key_value_groups, attn.head_dim
        out = (grad @ attn.o_proj.weight).view(batch, n, heads, head_dim)
        out = out.permute(2, 1, 0, 3).reshape(heads, n, batch * head_dim)
        values = torch.matmul(pattern.transpose(1, 2), out)  # (H, n, B*dh)
        values = values.view(heads // groups, groups, n, batch, head_dim).sum(1)  # undo repeat_interleave
        return values.permute(2, 1, 0, 3).reshape(batch, n, -1) @ attn.v_proj.weight

    # --- MLP ---------------------------------------------------------------------------------
    def mlp_gate_up(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mlp = self.layers[i].mlp
        return mlp.gate_proj(x), mlp.up_proj(x)

    def mlp_down(self, i: int, z: torch.Tensor) -> torch.Tensor:
        return self.layers[i].mlp.down_proj(z)

    def mlp_transpose(self, i: int, gate_coef: torch.Tensor, up_coef: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """Transpose of the linearised MLP ``x -> down(gate_coef * gate(x) + up_coef * up(x))``: (B, n, d) -> (B, n, d)."""
        mlp = self.layers[i].mlp
        inner = grad @ mlp.down_proj.weight
        return (inner * gate_coef) @ mlp.gate_proj.weight + (inner * up_coef) @ mlp.up_proj.weight


ARCHITECTURES: dict[str, type[LlamaFamily]] = {"qwen2": LlamaFamily}


def architecture_for(model: nn.Module) -> LlamaFamily:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UserError(f"attribution does not support model type {model_type!r} (supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[model_type](model)
