"""Build an output directory under a temporary sibling name and swap it in only when complete.

A crash or an error leaves the previous directory (or nothing) under the final name, never a half-written one.
Staging folders are named ``.{name}.tmp-{host}-{pid}-{random}``, so the next export into the same place can tell
the ones a killed run left behind (its process is gone) from those of a run still going, and removes them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from featurestore.errors import UserError, storage_full

_FOREIGN_STALE_S = 24 * 3600  # another host's staging folder untouched this long is treated as abandoned


def _describe(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def ensure_writable_parent(path: Path) -> list[Path]:
    """Create ``path``'s parent (one-line UserError if impossible) so a staging sibling can live there; returns
    the directories it created, deepest first (a failed export removes them again if they stayed empty)."""
    created = []
    parent = Path(path).absolute().parent
    while not parent.exists() and parent != parent.parent:
        created.append(parent)
        parent = parent.parent
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {Path(path).parent}: {_describe(exc)}") from None
    if not Path(path).parent.is_dir():
        raise UserError(f"cannot write under {Path(path).parent}: not a directory")
    return created


def remove_if_empty(directories: list[Path]) -> None:
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            return


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(folder: Path) -> bool:
    """Left by a run that is gone: this host's dead process, an old foreign one, or a name without an owner."""
    parts = folder.name.rsplit(".tmp-", 1)[-1].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return True  # the unowned names of earlier versions
    host, pid = parts[0], int(parts[1])
    if host == socket.gethostname():
        return not _process_alive(pid)
    try:
        return time.time() - folder.stat().st_mtime > _FOREIGN_STALE_S
    except OSError:
        return False


def clean_stale_staging(final: Path) -> list[Path]:
    """Remove staging folders a killed export of ``final`` left behind; restore a ``final`` lost mid-swap."""
    removed = []
    for folder in sorted(final.parent.glob(f".{final.name}.tmp-*")):
        if folder.is_dir() and _is_stale(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    olds = sorted(final.parent.glob(f".{final.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.replace(olds.pop(), final)  # killed between the two renames of _swap_in: the previous output returns
    for folder in olds:
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, *, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it becomes ``final``.

    An existing ``final`` is replaced only if it is empty or ``replaceable(final)`` says it holds an earlier
    output of the same kind (so a typo never wipes an unrelated directory).
    """
    final = Path(final).absolute()
    if final.parent.is_dir():
        clean_stale_staging(final)
    if final.exists():
        if not final.is_dir():
            raise UserError(f"{final} exists and is not a directory")
        if any(final.iterdir()) and not replaceable(final):
            raise UserError(f"{final} exists and holds other files; remove it or choose a new directory")
    created = ensure_writable_parent(final)
    staging = final.with_name(f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
    except OSError as exc:
        remove_if_empty(created)
        raise UserError(f"cannot write to {final.parent}: {_describe(exc)}") from None
    done = False
    try:
        yield staging
        _swap_in(staging, final)
        done = True
    except OSError as exc:
        error = storage_full(exc, final, "nothing was written there (the previous contents, if any, are kept)")
        if error is None:
            raise
        raise error from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        if not done:
            remove_if_empty(created)


def _swap_in(staging: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(staging, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
