"""Quoting, and the column expressions that several kinds of statement share.

Identifiers from users are always quoted with `quote_ident`; values are always
parameters (`quote_literal` is for DDL, and for the notification channel the write
statements name when they send notifications themselves).
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """``name`` as a double-quoted SQL identifier (embedded quotes doubled)."""
    if "\x00" in name:
        raise ValueError("identifiers cannot contain NUL characters")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    """``value`` as a standard-conforming SQL string literal (for DDL only)."""
    if "\x00" in value:
        raise ValueError("literals cannot contain NUL characters")
    return "'" + value.replace("'", "''") + "'"


def _stored(expression: str, column_data_type: str, *, metadata: bool = False) -> str:
    """A bytea value (UTF-8 JSON from the serializer) as the data column stores it. A
    jsonb store keeps absent metadata (JSON ``null``) as SQL NULL, as the Elixir
    library's JsonbSerializer writes it; a bytea store keeps the bytes ``null``."""
    if column_data_type == "bytea":
        return expression
    if metadata:
        return f"nullif(convert_from({expression}, 'UTF8')::jsonb, 'null'::jsonb)"
    return f"convert_from({expression}, 'UTF8')::jsonb"


def _data_columns(column_data_type: str, table: str = "e.") -> str:
    if column_data_type == "bytea":
        return f"{table}data, {table}metadata"
    return (
        f"convert_to({table}data::text, 'UTF8') AS data, "
        f"convert_to({table}metadata::text, 'UTF8') AS metadata"
    )
