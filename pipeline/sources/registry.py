"""The table of source kinds: settings validation, the connector factory and README's options
table all come from here. Adding a platform = its folder under `pipeline/sources/` (with
`OPTIONS`, `CONNECTOR`, `SUMMARY`, `EXAMPLE` in its `__init__`) and one line in `KINDS`; then
`python -m pipeline.sources.registry` prints README's options table to paste.

Importing this module loads only the options dataclasses (no HTTP client, no parser): the
settings module calls it at start-up.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.sources.options import STRING, SourceOptions, check_option, spec_of

if TYPE_CHECKING:
    from pipeline.settings import Settings, SourceConfig
    from pipeline.sources.connector import Connector

KINDS = (
    "mastodon",
    "bluesky",
    "reddit",
    "archive",
    "synthetic",
)


@dataclass(frozen=True)
class Kind:
    """One source kind: its options class, its connector (`module:Class`, imported when made),
    a few words for README and the options of a working source (for tests)."""

    name: str
    options: type[SourceOptions]
    connector: str
    summary: str
    example: dict[str, Any]
    serves_images: bool = False  # its connector's `image_bytes` gives the bytes (no HTTP fetch)


def _load(name: str) -> Kind:
    mod = importlib.import_module(f"pipeline.sources.{name}")
    return Kind(name, mod.OPTIONS, mod.CONNECTOR, mod.SUMMARY, dict(mod.EXAMPLE),
                bool(getattr(mod, "SERVES_IMAGES", False)))


REGISTRY: dict[str, Kind] = {name: _load(name) for name in KINDS}


def _all_specs() -> dict[str, tuple[str, Any]]:
    """Each option name known to any kind, with the check of the first kind declaring it."""
    out: dict[str, tuple[str, Any]] = {}
    for kind in [SourceOptions, *(k.options for k in REGISTRY.values())]:
        for f in dataclasses.fields(kind):
            out.setdefault(f.name, spec_of(kind, f.name))
    return out


_SPECS = _all_specs()
log = logging.getLogger(__name__)


def unknown_key(where: str, key: str, known: list[str]) -> None:
    """Say loudly that a config key means nothing to brandmon (a typo such as `limt` would
    otherwise be ignored without a word), with the closest known key when there is one."""
    near = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean `{near[0]}`?)" if near else ""
    log.warning("%s: unknown key `%s` is ignored%s", where, key, hint)


def check_options(source: str, kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """The options of one `sources:` entry, each known one in the type it needs (ConfigError
    otherwise). A key is checked as its kind declares it, else as another kind does (a stray
    `hashtags` on an archive is still a list), `*_env` keys as strings; others pass as given."""
    own = {f.name for f in dataclasses.fields(REGISTRY[kind].options)}
    out = {}
    for key, value in raw.items():
        if key in own:
            spec = spec_of(REGISTRY[kind].options, key)
        elif key in _SPECS:
            spec = _SPECS[key]
        elif key.endswith("_env"):
            spec = STRING
        else:
            unknown_key(f"source {source!r}", key, sorted(own))
            out[key] = value
            continue
        out[key] = check_option(source, key, value, spec)
    return out


def make_connector(settings: Settings, source: SourceConfig, *, sleep: Callable[[float], None] | None = None) -> Connector:
    """The connector for `source` (its `kind` picks the class); config errors raise ConfigError."""
    module, _, cls_name = REGISTRY[source.kind].connector.partition(":")
    cls = getattr(importlib.import_module(module), cls_name)
    return cls.from_settings(settings, source, sleep=sleep)


def _describe(f: dataclasses.Field[Any]) -> str:
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.metadata.get("required"):
        shown = " (required)"
    elif default is None or default == "":
        shown = ""
    elif isinstance(default, bool):
        shown = f" ({str(default).lower()})"
    elif isinstance(default, int | float):
        shown = f" ({default:,g})" if isinstance(default, float) else f" ({default:,})"
    else:
        shown = f" ({default})"
    return f"`{f.name}`{shown}: {f.metadata['doc']}"


def options_table() -> str:
    """README's table of source options, as Markdown (tests/sources checks README holds it)."""
    rows = ["| kind | options (default): what they set |", "| --- | --- |"]
    common = {f.name for f in dataclasses.fields(SourceOptions)}
    for kind in REGISTRY.values():
        own = [_describe(f) for f in dataclasses.fields(kind.options) if f.name not in common]
        rows.append(f"| `{kind.name}` | {kind.summary}; {'; '.join(own)} |")
    rows.append(f"| every kind | {'; '.join(_describe(f) for f in dataclasses.fields(SourceOptions))} |")
    return "\n".join(rows)


def options_of(source: SourceConfig) -> SourceOptions:
    """The typed options of `source` (checked), after the kind's own checks."""
    opts = REGISTRY[source.kind].options.read(source)
    opts.check(source.name)
    return opts


if __name__ == "__main__":  # README's table, to paste after adding or changing an option
    print(options_table())
