"""Read single features out of a pack the way the viewer does: index offsets, then one ranged read.

Locations: a local directory, an ``http(s)://`` URL of the directory (one ``Range`` request per feature), or a
Hugging Face scan string ``owner/repo[//sub/dir][@rev]`` resolved as the viewer does
(``https://huggingface.co/{repo}/resolve/{rev}/{sub/}features/``).
"""
from __future__ import annotations

import gzip
import json
import os
import struct
import urllib.error
import urllib.request
import zlib
from pathlib import Path

from featurestore.errors import UserError

INDEX_NAME = "index.json.gz"
_TIMEOUT_S = 60


def scan_to_url(scan: str) -> str:
    """The viewer's ``hfUrl`` grammar: ``owner/repo[//sub][@rev]`` -> the URL of its ``features/`` folder."""
    rest, _, revision = scan.partition("@")
    repo, _, subdir = rest.partition("//")
    subdir = subdir.strip("/")
    prefix = f"{subdir}/" if subdir else ""
    return f"https://huggingface.co/{repo}/resolve/{revision or 'main'}/{prefix}features/"


def _is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def decode_entry(raw: bytes) -> dict:
    """One ``uint32 LE length + gzip/zlib`` entry -> the feature document."""
    if len(raw) < 4:
        raise ValueError(f"entry of {len(raw)} bytes is shorter than its 4-byte length")
    (length,) = struct.unpack_from("<I", raw)
    if length > len(raw) - 4:
        raise ValueError(f"length prefix says {length} bytes but only {len(raw) - 4} follow")
    payload = zlib.decompress(raw[4:4 + length], wbits=47)  # 32+15: gzip or zlib header, as pako accepts
    return json.loads(payload)


class PackReader:
    """Holds one pack's index so that reading many features costs one ranged read each."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        if _is_url(location):
            self.base, self.local = location.rstrip("/") + "/", None
        elif Path(location).exists():
            self.base, self.local = None, Path(location)
        elif "/" in location and not location.startswith((".", "/")):
            self.base, self.local = scan_to_url(location), None
        else:
            raise UserError(f"{location} is neither a pack directory, an http(s) URL nor an owner/repo scan")
        self.location = location
        self._index: dict | None = None

    @property
    def index(self) -> dict:
        if self._index is None:
            raw = self._read_whole(INDEX_NAME)
            try:
                self._index = json.loads(gzip.decompress(raw))
            except (OSError, EOFError, ValueError) as exc:
                raise UserError(f"{self.location}: {INDEX_NAME} is not gzip-compressed JSON ({exc})") from None
        return self._index

    def layers(self) -> list[int]:
        return sorted(int(key) for key in self.index if key.isdigit())

    def span(self, layer: int, feature: int) -> tuple[str, int, int]:
        """(filename, start, end) of the feature's entry; start == end for a feature without an entry."""
        entry = self.index.get(str(layer))
        if entry is None:
            raise UserError(f"{self.location}: the pack has no layer {layer}")
        offsets = entry["offsets"]
        if not 0 <= feature < len(offsets) - 1:
            raise UserError(f"{self.location}: feature {feature} outside 0..{len(offsets) - 2} in layer {layer}")
        return entry["filename"], offsets[feature], offsets[feature + 1]

    def read_raw(self, layer: int, feature: int) -> bytes | None:
        filename, start, end = self.span(layer, feature)
        if start == end:
            return None
        return self._read_range(filename, start, end)

    def read(self, layer: int, feature: int) -> dict | None:
        """The feature's document, or None when the pack keeps no entry for it (a dead feature)."""
        raw = self.read_raw(layer, feature)
        if raw is None:
            return None
        try:
            return decode_entry(raw)
        except (ValueError, zlib.error) as exc:
            raise UserError(f"{self.location}: layer {layer} feature {feature}: corrupt entry ({exc})") from None

    # ---- transport ----

    def _read_whole(self, name: str) -> bytes:
        if self.local is not None:
            try:
                return (self.local / name).read_bytes()
            except OSError as exc:
                raise UserError(f"cannot read {self.local / name}: {exc.strerror}") from None
        return self._http(self.base + name, None)

    def _read_range(self, name: str, start: int, end: int) -> bytes:
        if self.local is not None:
            try:
                with open(self.local / name, "rb") as handle:
                    handle.seek(start)
                    data = handle.read(end - start)
            except OSError as exc:
                raise UserError(f"cannot read {self.local / name}: {exc.strerror}") from None
        else:
            data = self._http(self.base + name, (start, end))
        if len(data) != end - start:
            raise UserError(f"{self.location}/{name}: expected {end - start} bytes at {start}, got {len(data)} (truncated file?)")
        return data

    def _http(self, url: str, byte_range: tuple[int, int] | None) -> bytes:
        headers = {"Accept-Encoding": "identity"}
        if byte_range is not None:
            headers["Range"] = f"bytes={byte_range[0]}-{byte_range[1] - 1}"
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as response:
                if byte_range is not None and response.status != 206:
                    raise UserError(f"{url} ignored the Range request (status {response.status}); the viewer needs Range support")
                return response.read()
        except urllib.error.HTTPError as exc:
            raise UserError(f"GET {url} failed: HTTP {exc.code}") from None
        except urllib.error.URLError as exc:
            raise UserError(f"GET {url} failed: {exc.reason}") from None


def read_feature(pack: str | os.PathLike, layer: int, feature: int) -> dict | None:
    """One feature's document from a pack directory, URL or HF scan string (None if it has no entry)."""
    return PackReader(pack).read(layer, feature)
