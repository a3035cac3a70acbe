"""Atomic file writes: a crash leaves either the whole file under its final name or nothing there.

A store may also live on an object store (``s3://bucket/prefix``): ``store_path`` gives a ``RemotePath`` there,
which the same writes and the manifest use through pyarrow's filesystems, and DuckDB reads through fsspec.
"""
from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import UserError


def temp_path(path: Path) -> Path:
    """A sibling name that no reader glob (``*.parquet``, ``*.json``) matches."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class HashingFile(io.RawIOBase):
    """A write-only file that hashes the bytes on their way to ``handle``: a file's digest without reading it back."""

    def __init__(self, handle):
        super().__init__()
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.handle.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def info(self) -> dict:
        return {"size": self.size, "sha256": self.digest.hexdigest()}


def _record(info: dict | None, size: int, sha256: str) -> None:
    if info is not None:
        info.update(size=size, sha256=sha256)


def write_bytes_atomic(path, data: bytes, info: dict | None = None) -> Path:
    """``info``, when given, receives the written bytes' size and sha256 (what the manifest records)."""
    _record(info, len(data), hashlib.sha256(data).hexdigest())
    if is_remote(path):  # one PUT: the object appears whole or not at all
        path.write_bytes(data)
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike, info: dict | None = None, **options) -> Path:
    """Parquet with zstd by default; ``options`` go to ``pyarrow.parquet.write_table``; ``info`` as in
    ``write_bytes_atomic`` (hashed while writing, never re-read)."""
    options.setdefault("compression", "zstd")
    if is_remote(path):  # built in memory, then one PUT (a failed write leaves nothing under the name)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, **options)
        data = buffer.getvalue()
        _record(info, len(data), hashlib.sha256(data).hexdigest())
        path.write_bytes(data)
        return path
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as handle:
            sink = HashingFile(handle)
            pq.write_table(table, sink, **options)
            handle.flush()
            os.fsync(handle.fileno())
        if info is not None:
            info.update(sink.info())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


# ---- object stores (s3://bucket/prefix, gs://...): the subset of pathlib.Path a store uses, through pyarrow ----

class RemotePath:
    """A file or prefix on an object store, behaving like the ``pathlib.Path`` calls the store makes.

    Object stores have no directories and no rename: ``mkdir`` does nothing and one PUT of the whole object stands
    in for write-then-rename (an object appears whole or not at all). Credentials and endpoint come from the usual
    environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``, ...) or the URI's query (``?endpoint_override=...``).
    ``str()`` gives ``scheme://bucket/key``, which DuckDB reads once ``register_duckdb`` has run on its connection.
    """

    def __init__(self, filesystem, scheme: str, key: str, info=None):
        self.filesystem, self.scheme, self.key, self._info = filesystem, scheme, key.strip("/"), info

    @classmethod
    def from_uri(cls, uri: str) -> "RemotePath":
        import pyarrow.fs as pafs

        try:
            filesystem, key = pafs.FileSystem.from_uri(uri)
        except (pa.ArrowException, ValueError) as exc:
            raise UserError(f"cannot open {uri.split('?')[0]}: {str(exc).splitlines()[0]}") from None
        return cls(filesystem, uri.split("://", 1)[0], key)

    def __truediv__(self, other) -> "RemotePath":
        return RemotePath(self.filesystem, self.scheme, f"{self.key}/{str(other).strip('/')}")

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"RemotePath({str(self)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: "RemotePath") -> bool:
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.filesystem, self.scheme, self.key.rsplit("/", 1)[0])

    def with_name(self, name: str) -> "RemotePath":
        return self.parent / name

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def as_posix(self) -> str:
        return str(self)

    def expanduser(self) -> "RemotePath":
        return self

    absolute = expanduser

    def _file_info(self):
        if self._info is None:
            self._info = self.filesystem.get_file_info(self.key)
        return self._info

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._file_info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._file_info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._file_info().type == pafs.FileType.Directory

    def stat(self):
        return os.stat_result((0, 0, 0, 0, 0, 0, self._file_info().size or 0, 0, 0, 0))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        pass

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.key) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.filesystem.open_output_stream(self.key) as stream:
            stream.write(data)
        return len(data)

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def _list(self, recursive: bool) -> list["RemotePath"]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.key, allow_not_found=True, recursive=recursive)
        return [RemotePath(self.filesystem, self.scheme, info.path, info) for info in self.filesystem.get_file_info(selector)]

    def iterdir(self) -> list["RemotePath"]:
        return self._list(recursive=False)

    def glob(self, pattern: str) -> list["RemotePath"]:
        """Segment-wise ``fnmatch`` over one recursive listing below the pattern's fixed leading part."""
        parts = pattern.strip("/").split("/")
        fixed = 0
        while fixed < len(parts) - 1 and not any(c in parts[fixed] for c in "*?["):
            fixed += 1
        base = self / "/".join(parts[:fixed]) if fixed else self
        rest = parts[fixed:]
        found = []
        for path in base._list(recursive=len(rest) > 1 or "**" in rest):
            rel = path.relative_to(base).parts
            if "**" in rest and len(rest) == 2 and rest[0] == "**":
                match = fnmatch.fnmatchcase(rel[-1], rest[1])
            else:
                match = len(rel) == len(rest) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(rel, rest))
            if match:
                found.append(path)
        return sorted(found, key=str)

    def rglob(self, pattern: str) -> list["RemotePath"]:
        return self.glob(f"**/{pattern}")


def store_path(location) -> "Path | RemotePath":
    """A store location: ``scheme://...`` (s3, gs, ...) as a RemotePath, anything else as a local Path."""
    if isinstance(location, RemotePath):
        return location
    text = os.fspath(location) if isinstance(location, os.PathLike) else str(location)
    if "://" in text and not text.startswith("file://"):
        return RemotePath.from_uri(text)
    return Path(text.removeprefix("file://")).expanduser()


def is_remote(path) -> bool:
    return isinstance(path, RemotePath)


def open_parquet(path) -> pq.ParquetFile:
    """A Parquet file of the store, local or on an object store."""
    if is_remote(path):
        return pq.ParquetFile(path.filesystem.open_input_file(path.key))
    return pq.ParquetFile(path)


def register_duckdb(con, root: RemotePath) -> None:
    """Let DuckDB read ``scheme://`` paths through the store's own pyarrow filesystem (an fsspec wrapper)."""
    from fsspec.implementations.arrow import ArrowFSWrapper

    name = f"featurestore-{root.scheme}"
    if name in con.list_filesystems():
        return

    class StoreFilesystem(ArrowFSWrapper):
        protocol = root.scheme

        @property
        def fsid(self) -> str:
            return name

    con.register_filesystem(StoreFilesystem(root.filesystem))
