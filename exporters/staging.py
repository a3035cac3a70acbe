"""Build an output directory under a temporary sibling name and swap it in only when complete.

A crash or an error leaves the previous directory (or nothing) under the final name, never a half-written one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from featurestore.errors import UserError


def _describe(exc: OSError) -> str:
    return exc.strerror or exc.__class__.__name__


def ensure_writable_parent(path: Path) -> None:
    """Create ``path``'s parent (one-line UserError if impossible) so a staging sibling can live there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {path.parent}: {_describe(exc)}") from None
    if not path.parent.is_dir():
        raise UserError(f"cannot write under {path.parent}: not a directory")


@contextlib.contextmanager
def staged_directory(final: str | os.PathLike, *, replaceable: Callable[[Path], bool]) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``final``; on success it becomes ``final``.

    An existing ``final`` is replaced only if it is empty or ``replaceable(final)`` says it holds an earlier
    output of the same kind (so a typo never wipes an unrelated directory).
    """
    final = Path(final).absolute()
    if final.exists():
        if not final.is_dir():
            raise UserError(f"{final} exists and is not a directory")
        if any(final.iterdir()) and not replaceable(final):
            raise UserError(f"{final} exists and holds other files; remove it or choose a new directory")
    ensure_writable_parent(final)
    staging = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write to {final.parent}: {_describe(exc)}") from None
    try:
        yield staging
        _swap_in(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


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
