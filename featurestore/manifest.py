"""The store's manifest (``featurestore.json``): what the store holds and which chunks are committed.

A chunk's files are written under temporary names, renamed, and only then recorded here by an atomic
rewrite of the manifest; readers list files from the manifest, never by globbing, so a file whose chunk
was not recorded (a crash between rename and commit) is invisible and is overwritten on resume.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
from pathlib import Path
from typing import Iterator

from .errors import UserError
from .schema import FORMAT_VERSION, MANIFEST, READABLE_VERSIONS
from .storage import is_remote, store_path, write_bytes_atomic

# Settings that decide the tokens and sequences tables; a later run must match them exactly.
DATA_KEYS = ("format", "max_length", "max_samples", "skip_incomplete", "chunk_size", "tokenizer")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def is_store(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def _describe_version(version) -> str:
    """Shown in the refusal so that '1' (a string) never reads like 1."""
    if version is None:
        return f"unknown ({MANIFEST} has no integer format_version)"
    if type(version) is int:
        return str(version)
    return f"{version!r} (a {type(version).__name__} in {MANIFEST}, not an integer)"


def _newer(version) -> bool:
    return type(version) is int and version > FORMAT_VERSION


class Manifest:
    def __init__(self, root: Path, data: dict):
        self.root = root
        self.data = data

    # ---- reading
    @classmethod
    def load(cls, root: str | os.PathLike) -> "Manifest":
        root = store_path(root)
        file = root / MANIFEST
        if not file.is_file():
            raise UserError(f"{root} is not a feature store (no {MANIFEST})")
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{file} is corrupt: {getattr(exc, 'msg', None) or exc.reason}") from None
        if not isinstance(data, dict):
            raise UserError(f"{file} is corrupt: a {type(data).__name__} instead of a JSON object")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS or type(version) is not int:
            raise UserError(f"{root} has store format {_describe_version(version)}; this featurestore reads formats "
                            f"{', '.join(map(str, sorted(READABLE_VERSIONS)))}" + (" (upgrade featurestore)" if _newer(version) else ""))
        manifest = cls(root, data)
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Refuse a malformed manifest, a listed path outside the store and a file listed twice (one-line errors)."""
        file = self.root / MANIFEST
        try:
            for key, kind in (("model", dict), ("sources", dict), ("logit_lens", dict), ("chunks", list), ("runs", list)):
                if not isinstance(self.data.get(key), kind):
                    raise TypeError(key)
            listed = self.listed()
        except (TypeError, KeyError, AttributeError, ValueError) as exc:
            raise UserError(f"{file} is corrupt: malformed entry {str(exc) or type(exc).__name__}") from None
        seen = set()
        for rel in listed:
            if not inside_store(rel):
                raise UserError(f"{file} lists {rel!r}, which is outside the store; refusing to read it")
            if rel in seen:
                raise UserError(f"{file} lists {rel} twice; run `featurestore check {self.root}`")
            seen.add(rel)

    def listed(self) -> list[str]:
        """Every file the manifest lists (a file listed twice appears twice)."""
        out = [self.data["vocab"]] if self.data.get("vocab") else []
        for files in self.data.get("logit_lens", {}).values():
            out.extend(files)
        for record in self.chunks:
            for files in record["files"].values():
                out.extend(files)
        for layers in self.data.get("compacted", {}).values():
            for entry in layers.values():
                out.extend(entry["activations"] + entry["feature_stats"])
        out.extend((self.data.get("compacted_tokens") or {}).get("files", []))
        return out

    def hashes(self) -> dict[str, list]:
        """rel -> [size, sha256] of every file committed with a recorded hash (stores before version 2 have none)."""
        out = dict(self.data.get("hashes", {}))
        for record in self.chunks:
            out.update(record.get("hashes", {}))
        return out

    @property
    def model(self) -> dict:
        return self.data["model"]

    @property
    def chunks(self) -> list[dict]:
        return self.data["chunks"]

    def committed(self, source: str) -> set[int]:
        return {c["chunk"] for c in self.chunks if c["source"] == source}

    def has_tokens(self, chunk: int) -> bool:
        if chunk in (self.data.get("compacted_tokens") or {}).get("chunks", []):
            return True
        return any(c["chunk"] == chunk and c["files"].get("tokens") for c in self.chunks)

    def files(self, table: str, source: str | None = None) -> list[str]:
        """Committed files of a table, relative to the store root, in chunk order."""
        out = []
        if table == "tokens":  # compacted tokens first (featurestore.tokens_compaction)
            out.extend((self.data.get("compacted_tokens") or {}).get("files", []))
        if table in ("activations", "feature_stats"):  # compacted layers first (featurestore.compaction)
            for name, layers in sorted(self.data.get("compacted", {}).items()):
                if source is None or name == source:
                    for layer in sorted(layers, key=int):
                        out.extend(layers[layer][table])
        for record in sorted(self.chunks, key=lambda c: (c["chunk"], c["source"])):
            if source is None or record["source"] == source or table in ("tokens", "sequences"):
                out.extend(record["files"].get(table, []))
        if table == "logit_lens":
            for name, files in sorted(self.data.get("logit_lens", {}).items()):
                if source is None or name == source:
                    out.extend(files)
        return out

    def sources(self) -> list[str]:
        return sorted(self.data.get("sources", {}))

    # ---- writing
    def save(self) -> None:
        self.data["format_version"] = FORMAT_VERSION
        # compact JSON: the C encoder (an indented dump is ~10x slower, and this runs on every commit)
        write_bytes_atomic(self.root / MANIFEST, json.dumps(self.data, separators=(",", ":")).encode())

    @classmethod
    def create(cls, root: Path, model: dict, data: dict, settings: dict) -> "Manifest":
        root.mkdir(parents=True, exist_ok=True)
        manifest = cls(root, {
            "format_version": FORMAT_VERSION,
            "created": now(),
            "model": model,
            "data": data,
            "settings": settings,
            "sources": {},
            "vocab": None,
            "logit_lens": {},
            "runs": [],
            "chunks": [],
            "hashes": {},
        })
        manifest.save()
        return manifest

    def check_compatible(self, model: dict, data: dict, settings: dict, source: str, source_settings: dict) -> None:
        """Refuse to mix a different model, dataset or collection settings into this store."""
        mine = self.data
        for key in ("fingerprint", "weights_fingerprint"):
            if mine["model"].get(key) != model.get(key):
                raise UserError(f"store {self.root} was built from model {mine['model'].get('name')!r}; "
                                f"refusing to add activations of {model.get('name')!r} (use a new --store)")
        if mine["data"].get("sha256") != data.get("sha256"):
            raise UserError(f"store {self.root} was collected from {mine['data'].get('path')!r}; "
                            f"{data.get('path')!r} has different contents (use a new --store)")
        for key in DATA_KEYS:
            if mine["settings"].get(key) != settings.get(key):
                raise UserError(f"store {self.root} was collected with {key}={mine['settings'].get(key)!r}, "
                                f"not {settings.get(key)!r} (use a new --store or the same settings)")
        previous = mine["sources"].get(source)
        if previous is not None and previous != source_settings:
            diff = sorted(k for k in set(previous) | set(source_settings) if previous.get(k) != source_settings.get(k))
            raise UserError(f"store {self.root} holds {source} activations collected with other settings "
                            f"({', '.join(diff)}); use a new --store or the same settings")

    def commit_chunk(self, record: dict) -> None:
        if record["chunk"] in self.committed(record["source"]):
            raise RuntimeError(f"chunk {record['chunk']} of {record['source']} committed twice")
        self.chunks.append(record)
        self.save()
        from .checks import remember  # the stat cache: these files need no re-hash on the next open

        remember(self, record.get("hashes", {}))


def inside_store(rel) -> bool:
    """A listed path must be relative, normalised and below the store root (no ``..``, no absolute path)."""
    if not isinstance(rel, str) or not rel or rel[0] == "/" or "\\" in rel or "\x00" in rel or ":" in rel:
        return False
    return all(part not in ("", ".", "..") for part in rel.split("/"))


def remove_stale_temporaries(root: Path) -> list[Path]:
    """The manifest's (and the stat cache's) ``.tmp`` files a killed writer left; only called holding the writer lock."""
    stale = [p for p in root.glob(".*.tmp") if p.name.startswith((f".{MANIFEST}.", ".verified.json."))]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def writer_lock(root: Path) -> Iterator[None]:
    """One writer per store: a second concurrent ``collect`` fails fast instead of interleaving commits.

    Object stores have no locks: there, running one ``collect`` per store at a time is up to the user."""
    if is_remote(root):
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    handle = open(root / ".lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise UserError(f"store {root} is being written by another process") from None
    try:
        remove_stale_temporaries(root)
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
