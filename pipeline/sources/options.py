"""Typed source options: each platform's dataclass, its defaults and the one checker of values.

A platform declares its options as a dataclass (subclass of `SourceOptions`, which holds the
options every kind takes) whose fields carry a short description (`option(...)`). The field's
type decides the check: int (whole number, `low` bound), float (seconds, 0 or more), bool,
str, list[str] (a string or a list of strings), `choices`, or `date` (an ISO day). The checks
run when settings are loaded (`check_option`, one clear line per bad value instead of a
traceback inside a connector) and again when a connector reads its options (`read`), so a
`SourceConfig` built by hand is held to the same rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T", bound="SourceOptions")
Spec = tuple[str, "dataclasses.Field[Any] | None"]  # (check kind, the option's field)
STRING: Spec = ("str", None)  # e.g. an unknown `*_env` key: the NAME of a variable
DEFAULT_MAX_PAGES = 10_000


def option(default: Any, doc: str, *, low: int | None = None, choices: tuple[str, ...] = (), date: bool = False,
           required: bool = False) -> Any:
    """A dataclass field with what README's options table and the checks need."""
    meta = {"doc": doc, "low": low, "choices": choices, "date": date, "required": required}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class SourceOptions:
    """Options of every kind (the HTTP client's and the ingest job's)."""

    max_pages: int = option(DEFAULT_MAX_PAGES, "per stream and window", low=1)
    fetch_images: bool = option(True, "download the posts' images")
    user_agent: str | None = option(None, "the HTTP User-Agent (default: `network.user_agent`)")
    part_pages: int = option(20, "pages per raw-lake part (a resumed window restarts after the last part)", low=1)
    backoff_s: float = option(1.0, "first wait before a retry")
    max_wait_s: float = option(900.0, "longest wait a server's Retry-After may ask for")
    timeout_s: float | None = option(None, "per request (default: `network.timeout_s`)")

    @classmethod
    def read(cls: type[T], source: Any) -> T:
        """This kind's options from a `SourceConfig` (values checked; other keys ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: check_option(source.name, k, v, spec_of(cls, k)) for k, v in source.options.items() if k in known}
        return cls(**values)

    def check(self, name: str) -> None:
        """What the connector needs beyond the types (e.g. one of two lists); ConfigError if not."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def spec_of(cls: type, name: str) -> Spec:
    """(check kind, field) of option `name` of options class `cls`."""
    fld = next(f for f in dataclasses.fields(cls) if f.name == name)
    hint = _hints(cls)[name]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = set(typing.get_args(hint)) - {type(None)} if union else {hint}
    if fld.metadata.get("choices"):
        kind = "choice"
    elif fld.metadata.get("date"):
        kind = "date"
    elif bool in args:
        kind = "bool"
    elif int in args:
        kind = "int"
    elif float in args:
        kind = "seconds"
    elif any(typing.get_origin(a) in (list, tuple) for a in args):
        kind = "list"
    else:
        kind = "str"
    return kind, fld


def check_option(source: str, key: str, value: Any, spec: Spec) -> Any:
    """`value` in the type option `key` needs, or ConfigError naming the source and the option."""
    kind, fld = spec
    meta = fld.metadata if fld is not None else {}
    where = f"source {source!r}: `{key}`"
    if kind == "int":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{where} must be a whole number, got {value!r}; e.g. {key}: 10")
        low = meta.get("low")
        if low is not None and value < low:
            raise ConfigError(f"{where} must be at least {low}, got {value}")
        return value
    if kind == "seconds":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            raise ConfigError(f"{where} must be a number of seconds (0 or more), got {value!r}; e.g. {key}: 1.5")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind == "list":
        from pipeline.settings import str_list  # the one reader of string lists (brands use it too)

        return list(str_list(value, f"source {source!r}: `{key}`"))
    if kind == "date" and isinstance(value, dt.date):  # YAML reads an unquoted 2026-10-01 as a date
        value = value.isoformat()
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {type(value).__name__} {value!r}")
    if kind == "date":
        try:
            dt.date.fromisoformat(value)
        except ValueError:
            raise ConfigError(f"{where} must be a date like 2026-10-01, got {value!r}") from None
    choices = meta.get("choices")
    if kind == "choice" and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value

