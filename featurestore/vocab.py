"""The store's vocabulary: each token id's display text and raw bytes, decoded once per store.

Byte-level BPE tokens that hold part of a UTF-8 character are shown as lowercase ``\\xNN`` escapes,
the form the circuit-tracer viewer merges back into characters, instead of U+FFFD.
"""
from __future__ import annotations

import functools

import pyarrow as pa

from .schema import VOCAB


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The byte-level BPE alphabet: printable bytes map to themselves, the others to code points from 256 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    return decoder is not None and ("ByteLevel" in type(decoder).__name__ or "ByteLevel" in repr(decoder))


def build_vocab(tokenizer) -> pa.Table:
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    special = set(tokenizer.all_special_ids)
    added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    byte_level = _is_byte_level(tokenizer)
    table = _unicode_to_byte()
    ids, texts, raws, partial, specials = [], [], [], [], []
    for token_id, piece in enumerate(pieces):
        piece = piece if piece is not None else ""
        raw = None
        if token_id in added or token_id in special:
            raw = piece.encode("utf-8")
        elif byte_level and all(ch in table for ch in piece):
            raw = bytes(table[ch] for ch in piece)
        if raw is not None:
            text = raw.decode("utf-8", errors="backslashreplace")
            is_partial = "\\x" in text and raw.decode("utf-8", errors="replace") != text
        else:
            text = tokenizer.decode([token_id])
            is_partial = False
        ids.append(token_id)
        texts.append(text)
        raws.append(raw)
        partial.append(is_partial)
        specials.append(token_id in special)
    return pa.table({"token_id": ids, "token": texts, "raw": raws, "partial_utf8": partial, "special": specials}, schema=VOCAB)
