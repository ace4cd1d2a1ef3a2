"""Errors that the CLI turns into one clear line (what is wrong, how to fix it)."""

from __future__ import annotations


class BrandmonError(Exception):
    """A problem the user can fix; its message is shown as is, without a traceback."""

    exit_code = 2


class ConfigError(BrandmonError):
    """Bad settings: an unknown URL scheme, malformed YAML, a missing value."""


class StorageError(BrandmonError):
    """The object store cannot be reached or refuses an operation."""


class InvalidKeyError(StorageError):
    """An object key that could escape its prefix or is otherwise unsafe."""


class DatabaseError(BrandmonError):
    """The database cannot be reached or its schema is not at the expected revision."""


SHOWN_CHARS = 40


def cut(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` (a name, a value already formatted) cut to `limit` characters with an ellipsis."""
    return text if len(text) <= limit else f"{text[:limit]}…"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)` for an error message, cut to `limit` characters with an ellipsis: a user's
    5000-character value would otherwise fill the terminal (or a task log) in place of one line."""
    if isinstance(value, str) and len(value) > limit:
        quoted = repr(value[:limit])
        return f"{quoted[:-1]}…{quoted[-1]}"  # 'the first 40 characters…'
    try:
        return cut(repr(value), limit)
    except ValueError:  # an int of over 4300 digits has no repr
        return "<a number too long to show>"
