"""Verified files: every committed file's size and sha256 are in the manifest; these functions hold files to them.

Three levels, by cost:
- ``quick_check`` (every ``open``): the manifest's structure (``Manifest.validate``), every listed file's size (a
  stat), and the hash of any local file whose (size, inode, ctime) differs from when it was last hashed (the stat
  cache ``.verified.json``; a write to a file, even one that restores its mtime, changes its ctime). Cheap. Only
  writers (commits, compaction, check, upgrade) write the cache: reading never changes a byte of the store.
- ``verify_files`` (exports, before reading): re-hash exactly the files an export reads. One extra read.
- ``check_store`` (``featurestore check``): every listed file hashed in parallel, plus files present but not listed.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from tqdm.auto import tqdm

from .errors import UserError
from .manifest import Manifest, inside_store, writer_lock
from .schema import MANIFEST
from .storage import is_remote, store_path, write_bytes_atomic

STAT_CACHE = ".verified.json"
MANAGED_DIRS = ("activations", "feature_stats", "tokens", "sequences", "logit_lens")  # interp/, graphs/: glob tables
BLOCK = 8 << 20


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    if is_remote(path):
        with path.filesystem.open_input_stream(path.key) as stream:
            while block := stream.read(BLOCK):
                digest.update(block)
    else:
        with open(path, "rb", buffering=0) as handle:
            while block := handle.read(BLOCK):
                digest.update(block)
    return digest.hexdigest()


def _workers(workers: int | None) -> int:
    return max(1, workers or min(8, os.cpu_count() or 1))


def _sizes(manifest: Manifest, rels) -> dict[str, int | None]:
    """rel -> size on disk, or None when missing (object stores: one listing instead of a request per file)."""
    root = manifest.root
    if is_remote(root):
        present = {p.relative_to(root).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}
        return {rel: present.get(rel) for rel in rels}
    out = {}
    for rel in rels:
        try:
            out[rel] = os.stat(root / rel).st_size
        except (FileNotFoundError, NotADirectoryError):
            out[rel] = None
    return out


def size_problem(rel: str, size: int | None, recorded: list | None) -> str | None:
    if size is None:
        return f"{rel}: missing"
    if recorded is not None and size != recorded[0]:
        return f"{rel}: {'truncated' if size < recorded[0] else 'wrong size'} ({size:,} bytes, committed {recorded[0]:,})"
    return None


def _hash_all(manifest: Manifest, rels: list[str], sizes: dict, desc: str, progress: bool, workers: int | None) -> dict:
    """rel -> sha256 of each file, hashed in parallel with a byte progress bar."""
    root = manifest.root
    total = sum(sizes.get(rel) or 0 for rel in rels)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress or not rels, file=sys.stderr,
               delay=1)  # shown only when hashing takes a while

    def one(rel):
        try:
            return rel, sha256_of(root / rel)
        except OSError:
            return rel, None
        finally:
            bar.update(sizes.get(rel) or 0)

    try:
        with ThreadPoolExecutor(_workers(workers)) as pool:
            return dict(pool.map(one, rels))
    finally:
        bar.close()


# ---- the stat cache: local files known to match their recorded hash ----

def _stat_key(path) -> list[int]:
    st = os.stat(path)
    return [st.st_size, st.st_ino, st.st_ctime_ns]


def load_stat_cache(root) -> dict:
    if is_remote(root):
        return {}
    try:
        data = json.loads((root / STAT_CACHE).read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def save_stat_cache(root, cache: dict) -> None:
    """Best effort: a read-only store simply re-hashes changed files on each open."""
    if is_remote(root):
        return
    try:
        write_bytes_atomic(root / STAT_CACHE, json.dumps(cache, separators=(",", ":")).encode())
    except OSError:
        pass


def remember(manifest: Manifest, rels) -> None:
    """Record files just committed (hashed while written) as verified, so the next open does not re-hash them."""
    root = manifest.root
    if is_remote(root):
        return
    hashes = manifest.hashes()
    cache = load_stat_cache(root)
    added = 0
    for rel in rels:
        if rel in hashes:
            try:
                cache[rel] = _stat_key(root / rel) + [hashes[rel][1]]
                added += 1
            except OSError:
                continue
    if not added:
        return
    listed = set(manifest.listed())
    save_stat_cache(root, {rel: v for rel, v in cache.items() if rel in listed})


def quick_check(manifest: Manifest, progress: bool = True) -> None:
    """What every open runs: sizes of all listed files, hashes of local files changed since they were verified."""
    listed = manifest.listed()
    hashes = manifest.hashes()
    sizes = _sizes(manifest, listed)
    for rel in listed:
        problem = size_problem(rel, sizes[rel], hashes.get(rel))
        if problem:
            raise UserError(f"store {manifest.root} is damaged: {problem} (run `featurestore check`)")
    unhashed = [rel for rel in listed if rel not in hashes]
    if unhashed:
        print(f"note: {len(unhashed)} files of {manifest.root} have no recorded hash (written before verified files); "
              f"run `featurestore check --upgrade {manifest.root}` to record them", file=sys.stderr)
    root = manifest.root
    if is_remote(root):
        return
    cache = load_stat_cache(root)
    stale = []
    for rel in listed:
        if rel in hashes:
            entry = cache.get(rel)
            if entry is None or entry[3] != hashes[rel][1] or entry[:3] != _stat_key(root / rel):
                stale.append(rel)
    if not stale:
        return
    found = _hash_all(manifest, stale, sizes, "verify changed files", progress, None)
    for rel in stale:
        if found[rel] != hashes[rel][1]:
            raise UserError(f"store {root} is damaged: {rel}: wrong hash (contents changed since commit; "
                            f"run `featurestore check`)")


def verify_files(manifest: Manifest, rels: list[str], progress: bool = True, workers: int | None = None) -> None:
    """Re-hash the given listed files (what an export reads) and refuse on the first that does not match."""
    hashes = manifest.hashes()
    sizes = _sizes(manifest, rels)
    for rel in rels:
        problem = size_problem(rel, sizes[rel], hashes.get(rel))
        if problem:
            raise UserError(f"store {manifest.root} is damaged: {problem}; nothing exported")
    known = [rel for rel in rels if rel in hashes]
    found = _hash_all(manifest, known, sizes, "verify store files", progress, workers)
    for rel in known:
        if found[rel] != hashes[rel][1]:
            raise UserError(f"store {manifest.root} is damaged: {rel}: wrong hash; nothing exported "
                            f"(run `featurestore check`)")


def unlisted_files(root, listed: set[str]) -> list[str]:
    """Files in the store's table folders (and stray root-level Parquet or manifest temporaries) no record lists."""
    found = []
    for name in MANAGED_DIRS:
        directory = root / name
        if directory.is_dir():
            found += [p.relative_to(root).as_posix() for p in directory.rglob("*") if p.is_file()]
    for path in root.iterdir():
        if path.is_file() and (path.name.endswith(".parquet") or path.name.startswith(f".{MANIFEST}.")):
            found.append(path.relative_to(root).as_posix())
    return sorted(rel for rel in found if rel not in listed)


def check_store(location, progress: bool = True, workers: int | None = None) -> list[str]:
    """Every problem of a store, one line each naming the file (empty: every listed file matches its hash)."""
    root = store_path(location)
    manifest = _load_unvalidated(root)
    listed = manifest.listed()
    problems, seen, readable = [], set(), []
    for rel in listed:
        if not inside_store(rel):
            problems.append(f"{rel!r}: listed path outside the store")
        elif rel in seen:
            problems.append(f"{rel}: listed twice")
        else:
            seen.add(rel)
            readable.append(rel)
    hashes = manifest.hashes()
    sizes = _sizes(manifest, readable)
    to_hash = []
    for rel in readable:
        problem = size_problem(rel, sizes[rel], hashes.get(rel))
        if problem:
            problems.append(problem)
        elif rel not in hashes:
            problems.append(f"{rel}: no recorded hash (store written before verified files; "
                            f"`featurestore check --upgrade` records them)")
        else:
            to_hash.append(rel)
    found = _hash_all(manifest, to_hash, sizes, "check", progress, workers)
    cache = load_stat_cache(root)
    for rel in to_hash:
        if found[rel] is None:
            problems.append(f"{rel}: unreadable")
        elif found[rel] != hashes[rel][1]:
            problems.append(f"{rel}: wrong hash (contents differ from what was committed)")
        elif not is_remote(root):
            cache[rel] = _stat_key(root / rel) + [found[rel]]
    save_stat_cache(root, {rel: v for rel, v in cache.items() if rel in seen})
    problems += [f"{rel}: present but not listed in the manifest" for rel in unlisted_files(root, seen)]
    return problems


def _load_unvalidated(root) -> Manifest:
    """The manifest without ``validate`` (check reports every problem instead of stopping at the first)."""
    file = root / MANIFEST
    if not file.is_file():
        raise UserError(f"{root} is not a feature store (no {MANIFEST})")
    try:
        data = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise UserError(f"{file} is corrupt: {getattr(exc, 'msg', None) or exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} is corrupt: a {type(data).__name__} instead of a JSON object")
    manifest = Manifest(root, data)
    try:
        manifest.listed()
        manifest.hashes()
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise UserError(f"{file} is corrupt: malformed entry {str(exc) or type(exc).__name__}") from None
    return manifest


def upgrade(location, progress: bool = True, workers: int | None = None) -> int:
    """Record size and hash of every listed file that has none (stores written before verified files).

    Hashes what is on disk now, so it cannot tell an old file that was already damaged; returns the count."""
    root = store_path(location)
    with writer_lock(root):
        manifest = Manifest.load(root)
        hashes = manifest.hashes()
        todo = [rel for rel in manifest.listed() if rel not in hashes]
        sizes = _sizes(manifest, todo)
        missing = [rel for rel in todo if sizes[rel] is None]
        if missing:
            raise UserError(f"store {root} is damaged: {missing[0]}: missing; cannot upgrade")
        found = _hash_all(manifest, todo, sizes, "upgrade", progress, workers)
        manifest.data.setdefault("hashes", {}).update({rel: [sizes[rel], found[rel]] for rel in todo})
        manifest.save()
        remember(manifest, todo)
    return len(todo)
