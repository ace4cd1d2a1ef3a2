"""Settings: the YAML contract, env overrides, secrets hidden, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.settings import Secret, load_settings, redact_url


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"BRANDMON_HOME": str(tmp_path / "var"), **extra}


def test_defaults_are_sqlite_and_local_lake(tmp_path: Path) -> None:
    s = load_settings(env=_env(tmp_path))
    assert s.database_url == f"sqlite:///{(tmp_path / 'var' / 'brandmon.db').resolve()}"
    assert s.storage_url == (tmp_path / "var" / "lake").resolve().as_uri()
    assert s.brands == () and s.sources == ()


def test_yaml_contract_parses(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        """
brands:
  - name: Acme
    keywords: [acme]
    hashtags: [acme]
    products: [{name: Acme One, keywords: [acme one]}]
sources:
  - {name: masto, kind: mastodon, base_url: https://mastodon.social, hashtags: [acme]}
  - {name: history, kind: archive, path: /data/exports}
network:
  allowed_private_hosts: [127.0.0.1]
"""
    )
    s = load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(cfg)))
    assert s.brands[0].name == "Acme"
    assert s.brands[0].products[0].keywords == ("acme one",)
    assert s.source("masto").get("base_url") == "https://mastodon.social"
    assert s.source("history").kind == "archive"
    assert s.network.allowed_private_hosts == ("127.0.0.1",)


def test_env_overrides_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage_url: s3://from-yaml/x\n")
    s = load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(cfg), BRANDMON_STORAGE_URL="s3://from-env/y"))
    assert s.storage_url == "s3://from-env/y"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("brands: [\n  - name: x\n", "malformed YAML at line"),
        ("- just\n- a list\n", "top level must be a mapping"),
        ("sources:\n  - {name: a, kind: telegraph}\n", "kind must be one of"),
        ("brands:\n  - {keywords: [x]}\n", "needs a `name`"),
        ("brands:\n  - {name: A}\n  - {name: a}\n", "unique"),
    ],
)
def test_bad_yaml_gives_one_clear_error(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(cfg)))
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_storage_scheme(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown scheme 'ftp'.*s3://bucket/prefix"):
        load_settings(env=_env(tmp_path, BRANDMON_STORAGE_URL="ftp://x/y"))


def test_unsupported_database(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="supports sqlite and postgresql"):
        load_settings(env=_env(tmp_path, BRANDMON_DATABASE_URL="mysql://u:p@h/db"))


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(tmp_path / "nope.yaml")))


def test_secrets_never_show(tmp_path: Path) -> None:
    s = load_settings(env=_env(tmp_path, BRANDMON_AUTHOR_SALT="pepper-123",
                                BRANDMON_DATABASE_URL="postgresql://u:hunter2@db/x"))
    assert s.author_salt.get() == "pepper-123"
    assert "pepper-123" not in repr(s) and "pepper-123" not in str(s.describe())
    assert "hunter2" not in str(s.describe())
    assert redact_url("postgresql://u:hunter2@db/x") == "postgresql://u:***@db/x"
    assert repr(Secret("x")) == "Secret('***')" and f"{Secret('x')}" == "Secret('***')"


def test_salt_is_generated_once_and_private(tmp_path: Path) -> None:
    a = load_settings(env=_env(tmp_path)).author_salt.get()
    b = load_settings(env=_env(tmp_path)).author_salt.get()
    assert a == b and len(a) == 64
    assert (tmp_path / "var" / "author_salt").stat().st_mode & 0o077 == 0
