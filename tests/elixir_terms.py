"""A reader for the Elixir `inspect` output in elixir-sample-readback.txt.

Structs and maps become dicts with str keys; lists, strings, numbers, true/false/nil
become their Python values; ISO timestamps stay text. Enough for the terms the
reference holds, no more.
"""

from __future__ import annotations

import re
from typing import Any

_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
_ATOM_KEY = re.compile(r"([a-z_][a-zA-Z0-9_]*[?!]?): ")
_STRUCT = re.compile(r"%([A-Z][A-Za-z0-9_.]*)\{")
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\", "r": "\r"}


def parse_term(text: str, pos: int = 0) -> tuple[Any, int]:
    """Parse one term at ``pos``; returns (value, position after it)."""
    if text.startswith('"', pos):
        out = []
        pos += 1
        while text[pos] != '"':
            if text[pos] == "\\":
                out.append(_ESCAPES[text[pos + 1]])
                pos += 2
            else:
                out.append(text[pos])
                pos += 1
        return "".join(out), pos + 1
    if text.startswith("%{", pos):
        return _parse_map(text, pos + 2)
    struct = _STRUCT.match(text, pos)
    if struct:
        return _parse_map(text, struct.end())
    if text.startswith("[", pos):
        items: list[Any] = []
        pos += 1
        while not text.startswith("]", pos):
            value, pos = parse_term(text, pos)
            items.append(value)
            if text.startswith(", ", pos):
                pos += 2
        return items, pos + 1
    for word, value in (("true", True), ("false", False), ("nil", None)):
        if text.startswith(word, pos):
            return value, pos + len(word)
    timestamp = _TIMESTAMP.match(text, pos)
    if timestamp:  # a DateTime, as the readback prints it: kept as its text
        return timestamp.group(), timestamp.end()
    number = _NUMBER.match(text, pos)
    if number:
        literal = number.group()
        return (
            float(literal) if number.group(1) or number.group(2) else int(literal)
        ), number.end()
    raise ValueError(f"cannot parse Elixir term at {text[pos : pos + 30]!r}")


def _parse_map(text: str, pos: int) -> tuple[dict[str, Any], int]:
    result: dict[str, Any] = {}
    while not text.startswith("}", pos):
        atom = _ATOM_KEY.match(text, pos)
        if atom:
            key: Any = atom.group(1)
            pos = atom.end()
        else:
            key, pos = parse_term(text, pos)
            assert text.startswith(" => ", pos), text[pos : pos + 20]
            pos += 4
        value, pos = parse_term(text, pos)
        result[key] = value
        if text.startswith(", ", pos):
            pos += 2
    return result, pos + 1


def parse_terms(text: str) -> list[Any]:
    """Every space-separated term of ``text``."""
    values, pos = [], 0
    while pos < len(text):
        value, pos = parse_term(text, pos)
        values.append(value)
        while pos < len(text) and text[pos] == " ":
            pos += 1
    return values
