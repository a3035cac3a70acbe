"""Secrets out of everything a judge run stores or prints.

An endpoint may echo the request's key in an error body, a proxy may quote the ``Authorization`` header, a
model may repeat a key it saw. Every error message, raw response, answer and logged request body goes through
``Redactor`` before it reaches a table, a message or an export: the configured key is replaced wherever it
appears, and in what came back from the endpoint (errors, raw responses, answers) so is anything shaped like a
credential (``Bearer <token>``, ``sk-...``, ``api_key=...``, a password in a URL).
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable
from urllib.parse import quote

MASK = "***"
MIN_KEY_CHARS = 8  # shorter "keys" (EMPTY for local servers) are placeholders, not secrets

_PATTERNS = (  # (cheap test on the lowercased text, pattern): the regex runs only where the test passes
    (("bearer",), re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}")),
    (("key", "token", "secret"),
     re.compile(r"(?i)(\b(?:api[_-]?key|x-api-key|access[_-]?token|secret)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&]{8,}")),
    (("sk-", "rk-", "pk-"), re.compile(r"()\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}")),
    (("://",), re.compile(r"(://[^/\s:@]+:)[^/\s@]+(?=@)")),  # https://user:password@host
)


class Redactor:
    """Masks the given keys (and key-shaped strings) in text and in nested JSON-like values."""

    def __init__(self, keys: Iterable[str | None] = ()):
        forms: set[str] = set()
        for key in keys:
            if key and len(key) >= MIN_KEY_CHARS:
                forms |= {key, quote(key, safe=""), json.dumps(key)[1:-1]}
        self._keys = sorted(forms, key=len, reverse=True)

    def __call__(self, text: str | None) -> str | None:
        """Everything that came back from the endpoint: the key and key-shaped strings masked."""
        text = self.keys(text)
        if not text:
            return text
        low = text.lower()
        for triggers, pattern in _PATTERNS:
            if any(t in low for t in triggers):
                text = pattern.sub(lambda m: m.group(1) + MASK, text)
        return text

    def keys(self, text: str | None) -> str | None:
        """Only the configured key masked: cheap enough for every prompt sent (tens of kB, made from the store)."""
        if text:
            for key in self._keys:
                if key in text:
                    text = text.replace(key, MASK)
        return text

    def deep(self, value: Any) -> Any:
        """A request body with the configured key masked in every string in it (dicts and lists walked)."""
        if isinstance(value, str):
            return self.keys(value)
        if isinstance(value, dict):
            return {k: self.deep(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        return value
