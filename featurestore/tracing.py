"""Which features fire on a text: run the adapter model on it and read every adapter's features.

The text is formatted and tokenized as the store's data was (its ``format``, BOS rule and ``max_length``) and run
in float32 on the CPU by default, as collection runs. When the tokens are a stored sequence's, the pass is also
padded to the length of the batch that sequence was collected in (float32 kernels round differently at other
lengths), so tracing a text that is in the store gives exactly, bit for bit, the store's activations for it. Activations are kept sparse (only non-zeros), so a long text at 28 x 8192 stays small.
Torch is imported only when a trace runs.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .data import FORMATS, Row, adds_special_tokens, format_text
from .errors import UserError
from .text import merge_partial_bytes

if TYPE_CHECKING:
    from .store import Store

RAW_FORMAT = "raw"
TRACE_FORMATS = FORMATS + (RAW_FORMAT,)

_MODELS: dict[tuple, tuple] = {}
_MODELS_LOCK = threading.Lock()


def load_cached(model: str, dtype: str = "float32", device: str = "cpu", tokenizer: str | None = None):
    """(net, tokenizer, checkpoint info), loaded once per process: a server traces many texts with one model."""
    key = (str(model), dtype, device, tokenizer)
    with _MODELS_LOCK:
        if key not in _MODELS:
            from .modeling import load_model, load_tokenizer

            net, info = load_model(str(model), dtype=dtype, device=device)
            _MODELS[key] = (net, load_tokenizer(tokenizer or info.path), info)
        return _MODELS[key]


def check_same_model(store: "Store", info) -> None:
    """Refuse a checkpoint whose architecture or weights differ from the store's: its features are other features."""
    recorded = store.manifest.get("model", {})
    if recorded.get("fingerprint") and recorded["fingerprint"] != info.fingerprint:
        raise UserError(f"model {info.name!r} is not the store's model (config.json differs from {recorded.get('name')!r})")
    if recorded.get("weights_fingerprint"):
        from .modeling import weights_fingerprint

        if weights_fingerprint(info.path) != recorded["weights_fingerprint"]:
            raise UserError(f"model {info.name!r} has other weights than the store's model {recorded.get('name')!r}")


def store_settings(store: "Store | None") -> dict:
    return dict(store.manifest.get("settings", {})) if store is not None else {}


def encode(text: str, tokenizer, fmt: str = RAW_FORMAT, response: str | None = None, bos_format: str = "deepseek",
           max_length: int | None = None) -> list[int]:
    """Token ids of ``text``: with a data format, ``text`` is the user turn and ``response`` the assistant turn,
    formatted exactly as collection formats a dataset row; ``raw`` takes the text as it is (BOS as ``bos_format``)."""
    if fmt not in TRACE_FORMATS:
        raise UserError(f"unknown format {fmt!r}; use one of {', '.join(TRACE_FORMATS)}")
    if fmt == RAW_FORMAT:
        if response:
            raise UserError("a response turn needs a data format (deepseek, qwen, chat-template), not raw")
        ids = tokenizer(text, add_special_tokens=adds_special_tokens(bos_format))["input_ids"]
    else:
        formatted = format_text(Row(0, "", "", text, response or ""), fmt, tokenizer)
        ids = tokenizer(formatted, add_special_tokens=adds_special_tokens(fmt))["input_ids"]
    if not ids:
        raise UserError("the text has no tokens")
    return list(ids[:max_length] if max_length else ids)


def token_strings(store: "Store | None", tokenizer, ids: list[int]) -> tuple[list[str], list[str]]:
    """(vocab display string, readable text) per token; characters split across tokens are shown whole."""
    if store is not None:
        rows = store.con.execute("SELECT token_id, token, raw FROM vocab WHERE token_id IN (SELECT unnest(?::INTEGER[]))",
                                 [sorted(set(ids))]).fetchall()
        known = {token_id: (token, raw) for token_id, token, raw in rows}
    else:
        from .vocab import build_vocab

        table = build_vocab(tokenizer).to_pydict()
        known = {i: (table["token"][i], table["raw"][i]) for i in set(ids)}
    texts = [known.get(i, (f"<{i}>", None))[0] for i in ids]
    raws = [known.get(i, ("", None))[1] for i in ids]
    return texts, merge_partial_bytes(raws, texts)


@dataclass
class Trace:
    """Sparse activations of one text: arrays ``layer, pos, feature, act`` (sorted by layer, pos, feature)."""

    token_ids: list[int]
    tokens: list[str]  # vocab display strings (partial UTF-8 bytes as \\xNN)
    text: list[str]  # readable text per token (merged across partial bytes)
    layer: np.ndarray
    pos: np.ndarray
    feature: np.ndarray
    act: np.ndarray
    layers: list[int]
    descriptions: dict[tuple[int, int], str] = field(default_factory=dict)
    stored_seq_id: int | None = None  # the stored sequence with exactly these tokens, if any

    def __len__(self) -> int:
        return len(self.token_ids)

    def rows(self):
        """The activations as a polars DataFrame with the store's ``activations`` columns plus ``layer``."""
        import polars as pl

        return pl.DataFrame({"layer": self.layer, "feature": self.feature, "pos": self.pos, "act": self.act})

    def _index(self, name: str, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row order sorted by ``key``, sorted keys), built once: per-token and per-feature reads stay
        logarithmic on texts with millions of activations."""
        cache = self.__dict__.setdefault("_indexes", {})
        if name not in cache:
            order = np.argsort(key, kind="stable")
            cache[name] = (order, key[order])
        return cache[name]

    def at(self, pos: int, k: int | None = None) -> list[dict]:
        """The features active on token ``pos``, strongest first."""
        order, keys = self._index("pos", self.pos)
        rows = order[np.searchsorted(keys, pos, "left"):np.searchsorted(keys, pos, "right")]
        rows = rows[np.argsort(-self.act[rows], kind="stable")[:k]]
        return [{"layer": int(self.layer[r]), "feature": int(self.feature[r]), "act": float(self.act[r]),
                 "description": self.descriptions.get((int(self.layer[r]), int(self.feature[r])), "")} for r in rows]

    def feature_acts(self, layer: int, feature: int) -> list[float]:
        """This feature's activation on every token of the text (0.0 where inactive)."""
        out = np.zeros(len(self.token_ids), dtype=np.float32)
        order, keys = self._index("feature", self.layer.astype(np.int64) * (1 << 32) + self.feature)
        wanted = int(layer) * (1 << 32) + int(feature)
        rows = order[np.searchsorted(keys, wanted, "left"):np.searchsorted(keys, wanted, "right")]
        out[self.pos[rows]] = self.act[rows]
        return out.tolist()

    def top_features(self, k: int = 20) -> list[dict]:
        """Features by their largest activation on the text, with where it is and how many tokens they fire on."""
        if not len(self.act):
            return []
        key = self.layer.astype(np.int64) * (1 << 32) + self.feature
        order = np.lexsort((-self.act, key))
        first = np.r_[True, key[order][1:] != key[order][:-1]]
        heads = order[first]
        counts = np.diff(np.r_[np.flatnonzero(first), len(order)])
        best = np.argsort(-self.act[heads], kind="stable")[:k]
        return [{"layer": int(self.layer[heads[i]]), "feature": int(self.feature[heads[i]]),
                 "max_act": float(self.act[heads[i]]), "pos": int(self.pos[heads[i]]), "n_tokens": int(counts[i]),
                 "description": self.descriptions.get((int(self.layer[heads[i]]), int(self.feature[heads[i]])), "")}
                for i in best]

    def to_dict(self, per_token: int = 10, features: int = 50) -> dict:
        tops = self.top_features(features)
        return {"tokens": self.tokens, "text": self.text, "token_ids": self.token_ids, "layers": self.layers,
                "per_token": [self.at(p, per_token) for p in range(len(self.token_ids))],
                "features": [t | {"acts": self.feature_acts(t["layer"], t["feature"])} for t in tops]}


def run_features(net, ids: list[int], layers: list[int], pad_to: int | None = None,
                 pad_id: int = 0) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """One forward pass (no LM head) reading each layer's non-zero features: layer -> (pos, feature, act).
    ``pad_to`` right-pads the pass (masked) as a collection batch of that length was."""
    import torch

    from .capture import StopForward

    adapters = [layer.mlp for layer in net.model.layers]
    wanted, last = set(layers), max(layers)
    found: dict[int, tuple] = {}

    def hook(layer: int, features: torch.Tensor) -> None:
        if layer in wanted:
            dense = features[0, :len(ids)].float()
            pos, feat = dense.nonzero(as_tuple=True)
            found[layer] = (pos.to(torch.int32).cpu().numpy(), feat.to(torch.int32).cpu().numpy(),
                            dense[pos, feat].cpu().numpy().astype(np.float32))
        if layer == last:
            raise StopForward

    device = next(net.parameters()).device
    for adapter in adapters:
        adapter.feature_hook = hook
    try:
        length = max(len(ids), pad_to or 0)
        input_ids = torch.full((1, length), pad_id, dtype=torch.long)
        input_ids[0, :len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask = None
        if length > len(ids):
            mask = torch.zeros((1, length), dtype=torch.long, device=device)
            mask[0, :len(ids)] = 1
        with torch.inference_mode():
            try:
                net.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
            except StopForward:
                pass
    finally:
        for adapter in adapters:
            adapter.feature_hook = None
    return found


def trace(text: str, model, store: "Store | None" = None, *, response: str | None = None, format: str | None = None,
          layers: list[int] | None = None, dtype: str = "float32", device: str = "cpu", tokenizer: str | None = None,
          check_model: bool = True) -> Trace:
    """Run ``model`` (a checkpoint path, or a loaded ``(net, tokenizer)`` pair) on ``text`` and return its features.

    ``format`` defaults to the store's data format: ``text`` is then the user turn (``response`` the assistant
    turn); ``raw`` feeds the text as it is."""
    if tokenizer is None and store_settings(store).get("tokenizer") not in (None, "model"):
        tokenizer = store_settings(store)["tokenizer"]  # the store was tokenized with another tokenizer
    net, tok, info = _resolve(model, dtype, device, tokenizer)
    if store is not None and check_model and info is not None:
        check_same_model(store, info)
    settings = store_settings(store)
    fmt = format or settings.get("format", RAW_FORMAT)
    ids = encode(text, tok, fmt, response, settings.get("format", "deepseek"), settings.get("max_length"))
    if not hasattr(net.model.layers[0].mlp, "transcoder_enc"):
        raise UserError("the model has no transcoder adapter: nothing to trace")
    all_layers = list(range(len(net.model.layers)))
    if layers is None and store is not None:
        layers = (store.manifest.get("sources", {}).get("transcoder") or {}).get("layers")
    layers = sorted(layers or all_layers)
    if any(l not in all_layers for l in layers):
        raise UserError(f"layers {layers} outside the model's {len(all_layers)} layers")
    stored, pad_to = collected_batch(store, ids, tok) if store is not None else (None, None)
    pad_id = next(x for x in (tok.pad_token_id, tok.eos_token_id, 0) if x is not None)
    found = run_features(net, ids, layers, pad_to, pad_id)
    parts = [(np.full(len(found[l][0]), l, np.int32),) + found[l] for l in layers if l in found]
    layer, pos, feature, act = (np.concatenate([p[i] for p in parts]) if parts else np.zeros(0, np.int32) for i in range(4))
    order = np.lexsort((feature, pos, layer))
    tokens, readable = token_strings(store, tok, ids)
    trace_ = Trace(ids, tokens, readable, layer[order], pos[order], feature[order], act[order].astype(np.float32), layers,
                   stored_seq_id=stored)
    if store is not None and len(trace_.act):
        trace_.descriptions = _descriptions(store, trace_)
    return trace_


def collected_batch(store: "Store", ids: list[int], tokenizer=None,
                    max_candidates: int = 64) -> tuple[int | None, int | None]:
    """(seq_id, padded length of its collection batch) when ``ids`` are a stored sequence's tokens, else Nones.

    The batch is re-planned as collection planned it: the chunk's sequence lengths in row order, the run's
    ``batch_tokens``, ``collection.plan_batches``."""
    where, params = ["n_tokens = ?"], [len(ids)]
    if tokenizer is not None:  # narrow by the marker positions (the small sequences table) before reading tokens
        from .regions import MARKERS, MarkerIds, find_markers

        found = find_markers(np.asarray(ids), MarkerIds.from_tokenizer(tokenizer))
        for name in MARKERS:
            where.append(f"{name} IS NOT DISTINCT FROM ?")
            params.append(found[name])
    candidates = [s for (s,) in store.con.execute(
        f"SELECT seq_id FROM sequences WHERE {' AND '.join(where)} ORDER BY seq_id LIMIT ?",
        params + [max_candidates]).fetchall()]
    if not candidates:
        return None, None
    rows = store.con.execute("SELECT seq_id, list(token_id ORDER BY pos) FROM tokens WHERE seq_id BETWEEN ? AND ? "
                             "AND seq_id IN (SELECT unnest(?::INTEGER[])) GROUP BY seq_id ORDER BY seq_id",
                             [min(candidates), max(candidates), candidates]).fetchall()
    seq_id = next((s for s, tokens in rows if list(tokens) == list(ids)), None)
    manifest = store.manifest
    chunk = next((c for c in manifest.get("chunks", []) if c["source"] == "transcoder"
                  and c["rows"][0] <= (seq_id if seq_id is not None else -1) < c["rows"][1]), None)
    if chunk is None:
        return seq_id, None
    runs = [r for r in manifest.get("runs", []) if r.get("source") == "transcoder"
            and str(r.get("started", "")) <= str(chunk.get("committed", ""))]
    batch_tokens = ((runs[-1] if runs else {}).get("options") or {}).get("batch_tokens")
    if not batch_tokens:
        return seq_id, None
    from .collection import plan_batches

    members = store.con.execute("SELECT seq_id, n_tokens FROM sequences WHERE seq_id >= ? AND seq_id < ? ORDER BY seq_id",
                                [chunk["rows"][0], chunk["rows"][1]]).fetchall()
    lengths = [n for _, n in members]
    index = [s for s, _ in members].index(seq_id)
    batch = next(b for b in plan_batches(lengths, int(batch_tokens)) if index in b)
    return seq_id, lengths[batch[0]]


def _resolve(model, dtype: str, device: str, tokenizer: str | None):
    if isinstance(model, tuple):
        return model[0], model[1], (model[2] if len(model) > 2 else None)
    if model is None:
        raise UserError("tracing needs a model checkpoint (--model)")
    return load_cached(str(model), dtype, device, tokenizer)


def _descriptions(store: "Store", tr: Trace) -> dict[tuple[int, int], str]:
    try:
        frame = store.descriptions("transcoder")
    except Exception:  # no interp tables yet, or an older store: tracing works without labels
        return {}
    return {(int(l), int(f)): d for l, f, d in frame.iter_rows() if d}
