"""Interventions on adapter features: scale or zero features, or switch whole adapters off, and compare.

An edit changes what an adapter adds to its MLP's output: ``L/F=s`` multiplies feature F of layer L by s before the
decoder (0 turns it off); ``L=off`` drops adapter L's whole contribution (decoder bias included), as the original
demo toggles adapters. ``steer`` runs the same text both ways and reports the next-token distribution change at
every position and, under the same decoding settings, the continuation each way.
"""
from __future__ import annotations

import re
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import UserError

_EDIT = re.compile(r"^\s*(\d+|all)\s*(?:/\s*(\d+))?\s*=\s*(off|[-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Edit:
    layer: int | None  # None: every layer
    feature: int | None  # None: the whole adapter
    scale: float  # 0.0 turns the feature (or adapter) off

    def __str__(self) -> str:
        where = "all" if self.layer is None else str(self.layer)
        return f"{where}{'' if self.feature is None else '/' + str(self.feature)}=" + (
            "off" if self.scale == 0 and self.feature is None else f"{self.scale:g}")


def parse_edit(spec: str) -> Edit:
    """``3/17=0`` (zero a feature), ``3/17=2.5`` (scale it), ``3=off`` (adapter 3 off), ``all=off``."""
    match = _EDIT.match(spec)
    if not match:
        raise UserError(f"bad intervention {spec!r}: use LAYER/FEATURE=SCALE (3/17=0), LAYER=off or all=off")
    layer, feature, value = match.groups()
    if feature is None and value != "off":
        raise UserError(f"bad intervention {spec!r}: a whole adapter can only be turned off (LAYER=off)")
    if feature is not None and value == "off":
        value = "0"
    try:
        scale = 0.0 if value == "off" else float(value)
    except ValueError:
        raise UserError(f"bad intervention {spec!r}: {value!r} is not a number") from None
    return Edit(None if layer == "all" else int(layer), None if feature is None else int(feature), scale)


def check_edits(net, edits: list[Edit]) -> None:
    adapters = [layer.mlp for layer in net.model.layers]
    if not hasattr(adapters[0], "transcoder_enc"):
        raise UserError("the model has no transcoder adapter to intervene on")
    n_features = adapters[0].transcoder_enc.out_features
    for edit in edits:
        if edit.layer is not None and not 0 <= edit.layer < len(adapters):
            raise UserError(f"intervention {edit}: the model has layers 0..{len(adapters) - 1}")
        if edit.feature is not None and not 0 <= edit.feature < n_features:
            raise UserError(f"intervention {edit}: the adapters have features 0..{n_features - 1}")


@contextmanager
def edited(net, edits: list[Edit]):
    """Within the block, the adapters of ``net`` apply ``edits``; on exit the model is as it was."""
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    check_edits(net, edits)
    adapters = [layer.mlp for layer in net.model.layers]
    patched = []
    for index, adapter in enumerate(adapters):
        mine = [e for e in edits if e.layer is None or e.layer == index]
        if not mine:
            continue
        off = any(e.feature is None for e in mine)
        scales = {}
        for e in mine:
            if e.feature is not None:
                scales[e.feature] = scales.get(e.feature, 1.0) * e.scale

        def forward(self, x, off=off, scales=scales):
            base = Qwen2MLP.forward(self, x)  # the unchanged SwiGLU MLP
            features = self.encode(x)
            if scales:
                index = torch.as_tensor(list(scales), device=features.device)
                factor = torch.as_tensor(list(scales.values()), dtype=features.dtype, device=features.device)
                features = features.clone()
                features[..., index] = features[..., index] * factor
            if self.feature_hook is not None:
                self.feature_hook(self.layer_idx, features)
            return base if off else base + self.transcoder_dec(features)

        adapter.forward = types.MethodType(forward, adapter)
        patched.append(adapter)
    try:
        yield net
    finally:
        for adapter in patched:
            del adapter.forward


@dataclass
class Decoding:
    """The same settings both ways: greedy unless ``sample``; seeded sampling restarts from ``seed`` each way."""

    max_new_tokens: int = 20
    sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    seed: int = 0


@dataclass
class SteerResult:
    edits: list[str]
    token_ids: list[int]
    text: list[str]  # readable text per prompt token
    positions: list[dict]  # per position: kl, top tokens base/edited, tracked tokens' probabilities
    continuation_base: str = ""
    continuation_edited: str = ""
    decoding: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def next_token_probs(net, ids: list[int], edits: list[Edit] | None = None):
    """(T, V) float32 probabilities of the next token after every position."""
    import torch

    device = next(net.parameters()).device
    with torch.inference_mode(), edited(net, edits or []):
        logits = net(input_ids=torch.as_tensor([ids], dtype=torch.long, device=device), use_cache=False).logits[0]
    return torch.softmax(logits.float(), dim=-1)


def generate(net, tokenizer, ids: list[int], edits: list[Edit], decoding: Decoding) -> list[int]:
    import torch

    device = next(net.parameters()).device
    pad = next(x for x in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if x is not None)
    kwargs = {"do_sample": decoding.sample, "max_new_tokens": decoding.max_new_tokens, "pad_token_id": pad}
    if decoding.sample:
        kwargs |= {"temperature": decoding.temperature, "top_k": decoding.top_k or 0, "top_p": 1.0}
        torch.manual_seed(decoding.seed)
    else:
        kwargs |= {"temperature": None, "top_k": None, "top_p": None}
    with torch.inference_mode(), edited(net, edits):
        input_ids = torch.as_tensor([ids], dtype=torch.long, device=device)
        out = net.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return out[0, len(ids):].tolist()


def steer(net, tokenizer, ids: list[int], edits: list[Edit], *, decoding: Decoding | None = None, top: int = 5,
          track: list[int] | None = None, token_text=None) -> SteerResult:
    """Compare the model with and without ``edits`` on the token ids ``ids``."""
    import torch

    if not edits:
        raise UserError("no intervention given (e.g. --feature 3/17=0)")
    decoding = decoding or Decoding()
    if decoding.sample and not decoding.temperature > 0:
        raise UserError("sampling needs a temperature above 0 (or greedy decoding)")
    if decoding.max_new_tokens < 0:
        raise UserError("max_new_tokens must be 0 or more")
    base = next_token_probs(net, ids)
    after = next_token_probs(net, ids, edits)
    kl = (base * (base.clamp_min(1e-30).log() - after.clamp_min(1e-30).log())).sum(-1)
    decode = token_text or (lambda token_ids: [tokenizer.decode([t]) for t in token_ids])
    positions = []
    for pos in range(len(ids)):
        top_base = torch.topk(base[pos], min(top, base.shape[-1]))
        top_after = torch.topk(after[pos], min(top, after.shape[-1]))
        entry = {"pos": pos, "kl": float(kl[pos]),
                 "base": _tops(top_base, after[pos], decode), "edited": _tops(top_after, base[pos], decode, swap=True)}
        if track:
            entry["tracked"] = [{"token_id": t, "token": decode([t])[0], "p_base": float(base[pos, t]),
                                 "p_edited": float(after[pos, t])} for t in track]
        positions.append(entry)
    result = SteerResult([str(e) for e in edits], list(ids), decode(list(ids)), positions, decoding=dict(decoding.__dict__))
    if decoding.max_new_tokens > 0:
        result.continuation_base = tokenizer.decode(generate(net, tokenizer, ids, [], decoding))
        result.continuation_edited = tokenizer.decode(generate(net, tokenizer, ids, edits, decoding))
    return result


def _tops(top, other, decode, swap: bool = False) -> list[dict]:
    ids = top.indices.tolist()
    names = decode(ids)
    out = []
    for token_id, name, p in zip(ids, names, top.values.tolist()):
        p_other = float(other[token_id])
        base, edited_ = (p_other, p) if swap else (p, p_other)
        out.append({"token_id": token_id, "token": name, "p_base": base, "p_edited": edited_})
    return out


def steer_text(text: str, model, edits: list[Edit | str], store=None, *, response: str | None = None,
               format: str | None = None, decoding: Decoding | None = None, top: int = 5,
               track: list[str] | None = None, dtype: str = "float32", device: str = "cpu") -> SteerResult:
    """``steer`` on a text, formatted like the store's data (or ``raw``); ``model`` is a checkpoint path or a
    loaded ``(net, tokenizer)``; ``track`` names tokens (vocab display strings) whose probabilities to report."""
    from . import tracing

    other = tracing.store_settings(store).get("tokenizer")
    net, tokenizer, info = tracing._resolve(model, dtype, device, other if other not in (None, "model") else None)
    if store is not None and info is not None:
        tracing.check_same_model(store, info)
    settings = tracing.store_settings(store)
    fmt = format or settings.get("format", tracing.RAW_FORMAT)
    ids = tracing.encode(text, tokenizer, fmt, response, settings.get("format", "deepseek"), settings.get("max_length"))
    edits = [e if isinstance(e, Edit) else parse_edit(e) for e in edits]
    track_ids = [_token_id(tokenizer, t) for t in (track or [])]

    def token_text(token_ids):
        return tracing.token_strings(store, tokenizer, list(token_ids))[1]

    return steer(net, tokenizer, ids, edits, decoding=decoding, top=top, track=track_ids, token_text=token_text)


def _token_id(tokenizer, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"--track {token!r} is {len(ids)} tokens, not one")
    return ids[0]
