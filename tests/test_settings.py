"""Settings: the YAML contract, env overrides, secrets hidden, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
        # wrong types of known keys
        ("detector: 5\n", "`detector` must be a mapping"),
        ("detector: {batch_size: lots}\n", "batch_size must be a whole number"),
        ("network: [a, b]\n", "`network` must be a mapping"),
        ("network: {timeout_s: soon}\n", "timeout_s must be a number"),
        ("sources:\n  - {name: m, kind: mastodon, max_pages: lots}\n", "`max_pages` must be a whole number"),
        ("sources:\n  - {name: m, kind: mastodon, limit: 0}\n", "`limit` must be at least 1"),
        ("sources:\n  - {name: m, kind: mastodon, backoff_s: fast}\n", "`backoff_s` must be a number of seconds"),
        ("sources:\n  - {name: a, kind: archive, path: /x, fetch_images: maybe}\n", "`fetch_images` must be true or false"),
        ("sources:\n  - {name: a, kind: archive, path: [x]}\n", "`path` must be a string"),
        ("sources:\n  - {name: a, kind: archive, path: /x, html: sometimes}\n", "`html` must be one of auto, always, never"),
        ("sources:\n  - {name: m, kind: mastodon, hashtags: {a: 1}}\n", "source 'm': `hashtags` must be a list of strings"),
        ("sources:\n  - {name: s, kind: synthetic, start: someday}\n", "`start` must be a date"),
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


def test_source_options_are_normalised(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources:\n  - {name: s, kind: synthetic, start: 2026-10-01, days: '5', seed: 3, hashtags: acme}\n")
    src = load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(cfg))).source("s")
    assert src.options == {"start": "2026-10-01", "days": 5, "seed": 3, "hashtags": ["acme"]}


@pytest.mark.parametrize("url", ["file://relative/lake", "file://lake"])
def test_file_url_with_a_host_is_refused(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="file:///abs/path"):
        load_settings(env=_env(tmp_path, BRANDMON_STORAGE_URL=url))


def test_file_url_forms_that_name_an_absolute_path(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/lake", f"file://localhost{tmp_path}/lake"):
        assert load_settings(env=_env(tmp_path, BRANDMON_STORAGE_URL=url)).storage_url == url


def test_unknown_database_driver(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown database driver 'postgresql\\+nosuchdriver'"):
        load_settings(env=_env(tmp_path, BRANDMON_DATABASE_URL="postgresql+nosuchdriver://u@h/db"))


SALT_CHILD = """
import os, sys
from pipeline.settings import load_settings
if len(sys.argv) > 2:
    os.read(int(sys.argv[2]), 1)  # blocks until the parent closes the pipe: all start at once
print(load_settings(env={"BRANDMON_HOME": sys.argv[1]}).author_salt.get())
"""


def _salt_child(home: Path, *fd: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SALT_CHILD, str(home), *map(str, fd)], pass_fds=fd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_salt_generated_by_processes_at_once_is_one_salt(tmp_path: Path) -> None:
    """Processes starting together on a fresh BRANDMON_HOME all end with the one salt on disk."""
    for round_ in range(3):
        home = tmp_path / f"home{round_}"
        read_fd, write_fd = os.pipe()
        procs = [_salt_child(home, read_fd) for _ in range(4)]
        os.close(read_fd)
        time.sleep(1.0)  # let them import and block on the pipe
        os.close(write_fd)
        results = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), [err[-500:] for _out, err in results]
        on_disk = (home / "author_salt").read_text().strip()
        assert {out.strip() for out, _err in results} == {on_disk} and len(on_disk) == 64
        assert [p.name for p in home.iterdir()] == ["author_salt"]  # no temp file left behind
        assert (home / "author_salt").stat().st_mode & 0o077 == 0


def test_salt_written_by_another_process_meanwhile_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race made certain: another process creates the salt after this one found none and
    while it makes its own; this one must adopt the other's salt, not fail or overwrite it."""
    from pipeline import settings

    home = tmp_path / "var"
    other: list[str] = []

    def token_hex(n: int) -> str:
        proc = _salt_child(home)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        other.append(out.strip())
        return "c" * 2 * n

    monkeypatch.setattr(settings._secrets, "token_hex", token_hex)
    mine = load_settings(env=_env(tmp_path)).author_salt.get()
    assert other and len(other[0]) == 64 and mine == other[0] == (home / "author_salt").read_text()
    assert [p.name for p in home.iterdir()] == ["author_salt"]


def test_empty_salt_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "author_salt").write_text("")
    with pytest.raises(ConfigError, match="author salt file .* is empty"):
        load_settings(env=_env(tmp_path))


def test_unknown_keys_are_named_loudly_with_the_closest_known_one(tmp_path: Path, caplog) -> None:
    """Outside check of #13: `limt: 5` or `walk: sideways` on a source was ignored without a word."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources:\n  - {name: m1, kind: mastodon, base_url: 'https://m.example', hashtags: [acme], limt: 5,"
                   " walk: sideways}\nnetwork: {timeout_s: 5, max_retires: 2}\n")
    caplog.set_level("WARNING")
    s = load_settings(env=_env(tmp_path, BRANDMON_CONFIG=str(cfg)))
    assert s.network.timeout_s == 5
    text = caplog.text
    assert "source 'm1': unknown key `limt` is ignored (did you mean `limit`?)" in text
    assert "source 'm1': unknown key `walk` is ignored" in text
    assert "unknown key `max_retires` is ignored (did you mean `max_retries`?)" in text
    caplog.clear()
    load_settings(env=_env(tmp_path))  # a config with only known keys says nothing
    assert "unknown key" not in caplog.text
