"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or state the user can fix: printed as ``error: <message>``, exit status 2, no traceback."""
