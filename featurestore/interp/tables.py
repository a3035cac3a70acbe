"""The interp tables on disk: a buffered writer of atomic Parquet parts, and the reads that make resume work.

Layout: ``STORE/interp/<table>/run=<run_id>/part-*.parquet``. Rows are buffered and handed to a writer
thread every ``flush_rows`` rows or ``flush_seconds`` seconds (and at the end, also on Ctrl-C); each part
is written under a temporary name then renamed, so a killed run loses at most the last few seconds and
never leaves a half-written part. Request rows are written before the result rows they explain.
"""
from __future__ import annotations

import datetime as _dt
import json
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import zstandard

from ..schema import INTERP_SCHEMAS, interp_dir
from ..storage import write_parquet_atomic
from .client import Attempt

WRITE_ORDER = ("runs", "requests", "detection_examples", "scorer_examples", "explanations", "detection_scores",
               "scorer_scores", "classifications")
_COMPRESSOR = zstandard.ZstdCompressor(level=3)


def now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def compress_json(value) -> bytes:
    return _COMPRESSOR.compress(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def compress_text(text: str | None) -> bytes | None:
    return None if text is None else _COMPRESSOR.compress(text.encode())


def decompress_text(blob: bytes | None) -> str | None:
    """Inverse of ``compress_text``/``compress_json`` (the request column decodes to JSON text)."""
    return None if blob is None else zstandard.ZstdDecompressor().decompress(blob).decode()


class InterpWriter:
    """Collects rows per table and writes them as Parquet parts of one run.

    Parts are written by one background thread (in order), so the event loop never waits on the disk;
    ``close()`` writes what is left and waits, and raises if any write failed.
    """

    def __init__(self, root: str | Path, run_id: str, flush_rows: int = 2000, flush_seconds: float = 5.0):
        self.root = Path(root)
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_seconds = flush_seconds
        self._buffers: dict[str, list[dict]] = {name: [] for name in INTERP_SCHEMAS}
        self._pending = 0
        self._last_flush = time.monotonic()
        self._parts = 0
        self._tag = uuid.uuid4().hex[:6]
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="interp-writer")
        self._writes: list[Future] = []
        self.rows_written = {name: 0 for name in INTERP_SCHEMAS}

    def add(self, table: str, rows: dict | list[dict]) -> None:
        rows = [rows] if isinstance(rows, dict) else rows
        self._buffers[table].extend(rows)
        self._pending += len(rows)
        if self._pending >= self.flush_rows or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Hand the buffered rows to the writer thread (``wait``: and block until everything is on disk)."""
        if self._pending:
            buffers, self._buffers = self._buffers, {name: [] for name in INTERP_SCHEMAS}
            self._pending = 0
            self._writes = [f for f in self._writes if not f.done() or f.exception() is not None]
            self._writes.append(self._disk.submit(self._write, buffers))
        self._last_flush = time.monotonic()
        if wait:
            for future in self._writes:
                future.result()
            self._writes = []

    def close(self) -> None:
        try:
            self.flush(wait=True)
        finally:
            self._disk.shutdown(wait=True)

    def _write(self, buffers: dict[str, list[dict]]) -> None:
        for table in WRITE_ORDER:
            rows = buffers[table]
            if not rows:
                continue
            schema = INTERP_SCHEMAS[table]
            data = pa.Table.from_pylist([{k: row.get(k) for k in schema.names} for row in rows], schema=schema)
            self._parts += 1
            stamp = now().strftime("%Y%m%dT%H%M%S")
            name = f"part-{stamp}-{self._tag}-{self._parts:05d}.parquet"
            write_parquet_atomic(data, self.root / interp_dir(table, self.run_id) / name)
            self.rows_written[table] += len(rows)


def request_rows(run_id: str, source: str, layer: int, feature: int, purpose: str, attempts: list[Attempt],
                 first_attempt: int = 1) -> list[dict]:
    """One row per HTTP request, prompt and raw response compressed with zstd."""
    return [{
        "run_id": run_id, "source": source, "layer": layer, "feature": feature, "purpose": purpose,
        "attempt": first_attempt + i, "request_zstd": compress_json(a.body),
        "response_zstd": compress_text(a.response_text), "http_status": a.http_status, "outcome": a.outcome,
        "error": a.error, "prompt_tokens": a.prompt_tokens, "completion_tokens": a.completion_tokens,
        "latency_s": a.latency_s, "created_at": a.started_at,
    } for i, a in enumerate(attempts)]


def _glob(root: Path, table: str, run_id: str | None = None) -> str:
    return str(root / "interp" / table / (f"run={run_id}" if run_id else "run=*") / "*.parquet")


def _has_files(root: Path, table: str, run_id: str | None = None) -> bool:
    base = root / "interp" / table
    dirs = [base / f"run={run_id}"] if run_id else (list(base.glob("run=*")) if base.is_dir() else [])
    return any(any(d.glob("*.parquet")) for d in dirs if d.is_dir())


def read_rows(root: str | Path, table: str, run_id: str | None = None, where: str = "true",
              columns: str = "*") -> list[dict]:
    """Rows of an interp table straight from its files (no store views needed), latest row per key last."""
    root = Path(root)
    if not _has_files(root, table, run_id):
        return []
    con = duckdb.connect()
    try:
        query = (f"select {columns} from read_parquet(?, hive_partitioning=false, union_by_name=true) "
                 f"where {where} order by created_at" if table != "runs" else
                 f"select {columns} from read_parquet(?, hive_partitioning=false, union_by_name=true) "
                 f"where {where} order by started_at")
        rel = con.execute(query, [_glob(root, table, run_id)])
        names = [d[0] for d in rel.description]
        return [dict(zip(names, values)) for values in rel.fetchall()]
    finally:
        con.close()


def finished_keys(root: str | Path, table: str, run_id: str, key: tuple[str, ...]) -> set[tuple]:
    """Keys whose latest row in this run is ok or skipped: those are never requested again on resume."""
    latest: dict[tuple, str] = {}
    for row in read_rows(root, table, run_id, columns=", ".join(key + ("status", "created_at"))):
        latest[tuple(row[k] for k in key)] = row["status"]
    return {k for k, status in latest.items() if status in ("ok", "skipped")}


def latest_run(root: str | Path, kind: str, settings_hash: str | None = None) -> dict | None:
    """The most recently started run of this kind (with these settings, when given)."""
    rows = [r for r in read_rows(root, "runs") if r["kind"] == kind
            and (settings_hash is None or r["settings_hash"] == settings_hash)]
    return rows[-1] if rows else None
