"""Readable text from byte-level tokens: characters split across tokens are shown whole.

A byte-level BPE token can hold part of a UTF-8 character (the vocab shows such bytes as ``\\xNN``). Anything a
person reads (judge prompts, the CLI, the feature browser) goes through here, so ``A 40 \\xce\\xa9 resistor``
reads ``A 40 Ω resistor``. Formats that need the raw per-token form (the circuit-tracer feature JSON, which the
viewer merges itself) keep the vocab's display strings instead.
"""
from __future__ import annotations

import codecs
from typing import Sequence


def merge_partial_bytes(raws: Sequence[bytes | None], texts: Sequence[str]) -> list[str]:
    """One display string per token, with each character shown on the token that completes it.

    ``raws[i]`` is token i's raw bytes (None for tokens that are not byte-level, whose ``texts[i]`` is used as is);
    tokens holding only the leading bytes of a character show ``""``. Bytes that never form a character (a window
    cut mid-character, invalid UTF-8) stay as ``\\xNN`` on the token that holds them.
    """
    if len(raws) != len(texts):
        raise ValueError(f"{len(raws)} raw byte strings for {len(texts)} tokens")
    out: list[str] = []
    decoder = codecs.getincrementaldecoder("utf-8")(errors="backslashreplace")
    pending: list[int] = []  # indices of tokens whose bytes the decoder still holds
    for i, (raw, text) in enumerate(zip(raws, texts)):
        if raw is None:
            _flush(decoder, pending, out)
            out.append(text)
            continue
        piece = decoder.decode(raw)
        held = decoder.getstate()[0]
        if held and not piece:
            pending.append(i)
            out.append("")
            continue
        if held:
            # this token completed earlier characters and starts a new one; the new one's bytes wait with it
            out.append(piece)
            pending[:] = [i]
            continue
        pending.clear()
        out.append(piece)
    _flush(decoder, pending, out)
    return out


def _flush(decoder, pending: list[int], out: list[str]) -> None:
    """Bytes left undecoded (a window cut mid-character) go back to the tokens that held them, escaped."""
    leftover = decoder.getstate()[0]
    decoder.reset()
    if not leftover:
        pending.clear()
        return
    escaped = leftover.decode("utf-8", errors="backslashreplace")
    if pending:
        out[pending[-1]] = out[pending[-1]] + escaped if out[pending[-1]] else escaped
    pending.clear()


def readable_text(raws: Sequence[bytes | None], texts: Sequence[str]) -> str:
    """The tokens' text joined into one readable string."""
    return "".join(merge_partial_bytes(raws, texts))
