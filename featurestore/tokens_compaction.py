"""Compaction of the ``tokens`` table: every chunk's file merged into one file sorted by (seq_id, pos).

Example windows read the tokens of their sequences; with one file per chunk, a feature whose examples fall in 45 of
a real store's 80 chunks reads 45 files (~2 ms each), so per-feature latency grew with the store. Chunks hold
disjoint ranges of sequences (recorded in their ``rows``) and each file is sorted, so the merge is a concatenation
in sequence order, streamed a row group at a time, with no sort.

Committed like a compacted layer, by one atomic manifest rewrite: ``compacted_tokens`` lists the new file with its
[first, stop) range of sequences and the chunks it covers (``Manifest.has_tokens`` counts them, so a second source
never writes their tokens again), and those chunks' records drop their tokens file in the same rewrite. A kill
before the rewrite leaves the chunk files in force, after it the new file; the next writer deletes the leftovers.
"""
from __future__ import annotations

import sys

import pyarrow as pa

from . import checks, schema
from .compaction import Output
from .storage import open_parquet
from .manifest import Manifest

KEY = "compacted_tokens"


def inputs(manifest: Manifest) -> list[tuple[int, int, str, int | None]]:
    """(first, stop, file, chunk or None for a compacted file) of every tokens file, in sequence order."""
    entry = manifest.data.get(KEY) or {}
    found = [(int(a), int(b), rel, None) for rel, (a, b) in zip(entry.get("files", []), entry.get("rows", []))]
    for record in manifest.chunks:
        for rel in record["files"].get("tokens", []):
            found.append((int(record["rows"][0]), int(record["rows"][1]), rel, record["chunk"]))
    return sorted(found)


def needs_compaction(manifest: Manifest) -> bool:
    found = inputs(manifest)
    return len(found) > 1 and any(chunk is not None for *_, chunk in found)


def remove_unlisted(manifest: Manifest) -> None:
    """Leftovers of a killed tokens compaction (a new file never committed, or old chunk files not yet deleted)."""
    listed = set(manifest.listed())
    for path in (manifest.root / "tokens").glob("*"):
        if path.is_file() and path.relative_to(manifest.root).as_posix() not in listed:
            path.unlink(missing_ok=True)


def compact_tokens(manifest: Manifest) -> int:
    """Merge every tokens file into one and commit it; returns the number of files merged (0: nothing to do, or
    files whose sequences overlap, which only a damaged manifest holds and which stay as they are)."""
    found = inputs(manifest)
    for (_, stop, left, _), (first, _, right, _) in zip(found, found[1:]):
        if first < stop:
            print(f"note: tokens files {left} and {right} hold overlapping sequences; tokens stay uncompacted",
                  file=sys.stderr)
            return 0
    root = manifest.root
    checks.verify_files(manifest, [rel for _, _, rel, _ in found], progress=False)
    entry = manifest.data.get(KEY) or {}
    generation = int(entry.get("generation", 0)) + 1
    hashes: dict[str, list] = {}
    writer = Output(root, f"tokens/compact-g{generation:04d}", hashes, schema.TOKENS, {"compression": "zstd"},
                    group_rows=schema.TOKENS_ROW_GROUP, file_rows=None)
    try:
        pending, size = [], 0
        for _, _, rel, _ in found:
            file = open_parquet(root / rel)
            for group in range(file.metadata.num_row_groups):
                table = file.read_row_group(group).cast(schema.TOKENS)
                pending.append(table)
                size += table.num_rows
                if size >= schema.TOKENS_ROW_GROUP:  # full row groups, whatever the inputs' sizes
                    writer.write(pa.concat_tables(pending))
                    pending, size = [], 0
        if pending:
            writer.write(pa.concat_tables(pending))
        outputs = writer.close()
    finally:
        writer.abort()
    old = {rel for _, _, rel, _ in found}
    chunks = set(entry.get("chunks", [])) | {chunk for *_, chunk in found if chunk is not None}
    for record in manifest.chunks:
        record["files"]["tokens"] = [rel for rel in record["files"].get("tokens", []) if rel not in old]
        for rel in old & set(record.get("hashes", {})):
            del record["hashes"][rel]
    manifest.data[KEY] = {"generation": generation, "files": outputs, "rows": [[found[0][0], max(b for _, b, _, _ in found)]],
                          "chunks": sorted(chunks)}
    table_hashes = manifest.data.setdefault("hashes", {})
    for rel in old & set(table_hashes):
        del table_hashes[rel]
    table_hashes.update(hashes)
    manifest.save()
    checks.remember(manifest, hashes)
    for rel in sorted(old):
        (root / rel).unlink(missing_ok=True)
    return len(found)
