"""Read-only SQL for users (``Store.sql``, ``featurestore sql``): queries read the store and any local file, and
change nothing.

Two layers, each tested against the attacks in tests/test_readonly_sql.py:
- every statement is parsed by DuckDB's own parser (``extract_statements``) and only ``SELECT`` (which covers
  ``FROM``, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``) and ``EXPLAIN`` of a ``SELECT`` run; ``COPY``,
  ``ATTACH``, ``CREATE`` (tables, views, macros, secrets), ``INSTALL``/``LOAD``, ``SET``/``RESET``, ``PRAGMA``,
  ``EXPORT``, DML and the rest get a one-line error;
- queries run on their own in-memory connection whose extension installing and autoloading are off (so no query
  reaches the network or loads code) and whose configuration is then locked (so nothing re-enables them).
``enable_external_access`` stays on: users may read other local files, which a read never damages.
"""
from __future__ import annotations

import re

import duckdb

from .errors import UserError

ALLOWED = {duckdb.StatementType.SELECT}
SETTINGS = ("SET autoinstall_known_extensions = false", "SET autoload_known_extensions = false",
            "SET allow_community_extensions = false", "SET allow_persistent_secrets = false",
            "SET lock_configuration = true")
_EXPLAIN = re.compile(r"\s*explain\s+(?:analy[sz]e\s+)?(.*)", re.IGNORECASE | re.DOTALL)


def _statement_name(statement) -> str:
    return str(statement.type).rsplit(".", 1)[-1]


def check_read_only(query: str, con: duckdb.DuckDBPyConnection | None = None) -> None:
    """Raise ``UserError`` unless every statement of ``query`` only reads. Parsing on ``con`` spares DuckDB's
    default connection (~0.1 s to make, per process)."""
    parse = (con or duckdb).extract_statements
    try:
        statements = parse(query)
    except duckdb.Error as exc:
        raise UserError(f"SQL error: {str(exc).splitlines()[0]}") from None
    for statement in statements:
        if statement.type in ALLOWED:
            continue
        if statement.type == duckdb.StatementType.EXPLAIN:
            inner = _EXPLAIN.match(statement.query)
            if inner and all(s.type in ALLOWED for s in parse(inner.group(1))):
                continue
        raise UserError(f"{_statement_name(statement)} statements are refused: SQL over a store is read-only "
                        "(write a query's result with --output, or Store.sql(...).to_parquet/.pl() in Python)")


def lock(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No extension installs or autoloads, no persistent secrets, and the configuration locked for good."""
    for setting in SETTINGS:
        con.execute(setting)
    return con
