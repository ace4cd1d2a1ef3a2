"""The source registry: one table for settings validation, the connector factory and README."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import SOURCE_KINDS, NetworkConfig, SourceConfig, load_settings
from pipeline.sources import registry
from pipeline.sources.options import SourceOptions

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_options_table_is_the_registry_s():
    table = registry.options_table()
    assert table in README.read_text(encoding="utf-8"), (
        "README's source options table differs from pipeline.sources.registry.options_table(); paste the output of `python -m pipeline.sources.registry`")
    for kind in registry.KINDS:
        for f in dataclasses.fields(registry.REGISTRY[kind].options):
            assert f"`{f.name}`" in table


def test_settings_kinds_and_connectors_come_from_the_registry(tmp_path):
    """Each kind's `EXAMPLE` options (from its folder) make a connector of its class."""
    assert SOURCE_KINDS == registry.KINDS
    settings = load_settings(env={"BRANDMON_HOME": str(tmp_path)})
    for kind in registry.KINDS:
        opts = registry.REGISTRY[kind].options
        assert issubclass(opts, SourceOptions) and dataclasses.is_dataclass(opts)
        example = registry.REGISTRY[kind].example  # the folder's own: a new platform needs no line here
        assert {f.name for f in dataclasses.fields(opts) if f.metadata.get("required")} <= set(example)
        conn = registry.make_connector(settings, SourceConfig(name="s", kind=kind, options=dict(example)))
        assert conn.kind == kind and isinstance(conn.options, opts)
        conn.close()


def test_options_are_typed_with_defaults_and_checked_when_read():
    from pipeline.sources.mastodon.options import MastodonOptions

    opts = MastodonOptions.read(SourceConfig(name="m", kind="mastodon", options={"limit": "5", "hashtags": "acme", "other": 1}))
    assert (opts.limit, opts.hashtags, opts.max_pages, opts.walk) == (5, ["acme"], 10_000, "auto")
    with pytest.raises(ConfigError, match=r"source 'm': `limit` must be at least 1"):
        MastodonOptions.read(SourceConfig(name="m", kind="mastodon", options={"limit": 0}))
    with pytest.raises(ConfigError, match="give `hashtags` and/or `accounts`"):
        registry.make_connector(load_settings(env={}), SourceConfig(name="m", kind="mastodon", options={"base_url": "https://x.example"}))
    from pipeline.sources.archive.connector import ArchiveConnector

    conn = ArchiveConnector(SourceConfig(name="a", kind="archive", options={"path": "/x", "max_row_bytes": "7"}), NetworkConfig())
    assert conn.limits.max_row_bytes == 7 and conn.options.html == "auto"


def test_a_kind_that_serves_its_own_images_says_so_in_its_folder():
    """Outside check of #13: the image job named `synthetic` itself; now each platform's folder
    declares SERVES_IMAGES, and exactly those connectors override `image_bytes`."""
    import importlib

    from pipeline.sources.connector import Connector
    from pipeline.sources.registry import REGISTRY

    served = {name for name, kind in REGISTRY.items() if kind.serves_images}
    assert served == {"synthetic"}
    for name, kind in REGISTRY.items():
        module, _, cls_name = kind.connector.partition(":")
        cls = getattr(importlib.import_module(module), cls_name)
        assert (cls.image_bytes is not Connector.image_bytes) == kind.serves_images, name
