"""Writing a DuckDB result as a table, CSV, JSON or Parquet (for ``featurestore sql``)."""
from __future__ import annotations

import json
import sys

import duckdb

from .errors import UserError


def csv_flat(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """CSV cells cannot hold lists, structs or maps: those columns are written as their JSON text."""
    nested = ("STRUCT", "MAP", "UNION")
    columns = []
    for name, kind in zip(rel.columns, rel.types):
        quoted = '"' + name.replace('"', '""') + '"'
        text = str(kind)
        is_nested = text.startswith(nested) or text.endswith("]")
        columns.append(f"to_json({quoted})::VARCHAR AS {quoted}" if is_nested else quoted)
    return rel.project(", ".join(columns)) if columns else rel


def write_relation(rel: duckdb.DuckDBPyRelation, fmt: str, output: str | None, max_rows: int = 40) -> None:
    if fmt == "parquet":
        if not output:
            raise UserError("--format parquet needs --output FILE")
        rel.to_parquet(output, compression="zstd")
        return
    if fmt == "csv":
        text = csv_flat(rel).pl().write_csv()
    elif fmt == "json":
        text = json.dumps(rel.pl().to_dicts(), default=str, ensure_ascii=False, indent=1) + "\n"
    else:
        import polars as pl

        frame = rel.pl()
        with pl.Config(tbl_rows=max_rows, tbl_cols=-1, fmt_str_lengths=60, tbl_width_chars=160, tbl_hide_dataframe_shape=True,
                       tbl_hide_column_data_types=True, tbl_hide_dtype_separator=True):
            text = f"{frame}\n"
    if output:
        with open(output, "w") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
