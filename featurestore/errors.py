"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or state the user can fix: printed as ``error: <message>``, exit status 2, no traceback."""


def storage_full(exc: BaseException, path, consequence: str) -> UserError | None:
    """A one-line UserError for a write that failed because the disk (or quota) is full, else None.

    ``path`` is what the user chose (the store or the output folder); ``consequence`` says what was kept."""
    import errno

    codes = {errno.ENOSPC, errno.EFBIG} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
    if not isinstance(exc, OSError) or exc.errno not in codes:
        return None
    import os

    detail = f" (writing {exc.filename})" if exc.filename else ""
    return UserError(f"cannot write {path}: {os.strerror(exc.errno)}{detail}; {consequence}")
