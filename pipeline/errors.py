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
