"""Objects named ``"package.module:name"`` on the command line or in the environment."""

from __future__ import annotations

import importlib

__all__ = ["import_named"]


def import_named(target: str, what: str, form: str = "package.module:name") -> object:
    """The object ``target`` names (None when the module has no such attribute).

    Raises:
        ValueError: ``target`` is not of that ``form``, or its module cannot be imported
            (the message starts with ``what`` and the target).
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{what} {target!r}: expected {form!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"{what} {target!r}: cannot import {module_name!r}: {exc}") from exc
    return getattr(module, attr, None)
