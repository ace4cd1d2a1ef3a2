"""Where the environment is read: `pipeline.settings` (and, for the DAG files' parse-time knobs,
`pipeline.dag_support`), nowhere else in the package; and the per-process knobs settings reads."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest

from pipeline import settings as settings_mod
from pipeline.errors import ConfigError, StorageError

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# the settings module, and the light module the DAG files import at parse time (it cannot
# import settings: YAML and the config parsers would load on every parse)
ALLOWED = {"settings.py", "dag_support.py"}


def environment_reads(source: str) -> list[int]:
    """Line numbers where `source` touches the process environment: os.environ, os.getenv,
    os.putenv, os.unsetenv, or `environ`/`getenv` imported from os."""
    names = ("environ", "environb", "getenv", "putenv", "unsetenv")

    def reads(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute):
            return node.attr in names and isinstance(node.value, ast.Name) and node.value.id == "os"
        return isinstance(node, ast.ImportFrom) and node.module == "os" and any(a.name in names for a in node.names)

    return [node.lineno for node in ast.walk(ast.parse(source)) if reads(node)]


def test_the_detector_finds_every_spelling():
    assert environment_reads("import os\nos.environ.get('X')\n") == [2]
    assert environment_reads("import os\nx = os.getenv('X')\n") == [2]
    assert environment_reads("from os import environ as e\n") == [1]
    assert environment_reads("import os\nos.environ.setdefault('A', 'b')\n") == [2]
    assert environment_reads("import os\nos.path.join('a')\nenv = {}\nenv.get('x')\n") == []


def test_only_settings_and_the_dag_knobs_read_the_environment():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        lines = environment_reads(path.read_text())
        if lines:
            found[rel] = lines
    assert not found, f"read the environment through pipeline.settings instead: {found}"
    assert all(environment_reads((PACKAGE / name).read_text()) for name in ALLOWED)  # the rule is live


def test_lock_ttl_and_host(monkeypatch):
    monkeypatch.delenv("BRANDMON_LOCK_TTL_S", raising=False)
    monkeypatch.delenv("BRANDMON_LOCK_HOST", raising=False)
    assert settings_mod.lock_ttl_s() == 120.0
    assert settings_mod.lock_host() == socket.gethostname()
    monkeypatch.setenv("BRANDMON_LOCK_TTL_S", "30")
    monkeypatch.setenv("BRANDMON_LOCK_HOST", "worker-7")
    assert settings_mod.lock_ttl_s() == 30.0
    assert settings_mod.lock_host() == "worker-7"
    for bad in ("inf", "nan", "0.5", "1e9", "soon"):
        monkeypatch.setenv("BRANDMON_LOCK_TTL_S", bad)
        with pytest.raises(ConfigError, match="BRANDMON_LOCK_TTL_S"):
            settings_mod.lock_ttl_s()
    monkeypatch.setenv("BRANDMON_LOCK_HOST", "h" * 101)
    with pytest.raises(ConfigError, match="longer than 100"):
        settings_mod.lock_host()


def test_s3_attempts(monkeypatch):
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    assert settings_mod.s3_max_attempts() == 9
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert settings_mod.s3_max_attempts() == 3
    for bad in ("0", "-1", "x", "2.5"):
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", bad)
        with pytest.raises(StorageError, match="AWS_MAX_ATTEMPTS"):
            settings_mod.s3_max_attempts()


def test_keras_home_mirror_and_runtime(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("BRANDMON_IMAGENET_URL", raising=False)
    monkeypatch.delenv("BRANDMON_DETECT_RUNTIME", raising=False)
    assert settings_mod.keras_home() == tmp_path
    assert settings_mod.imagenet_mirror() is None
    assert settings_mod.detect_runtime("onnx") == "onnx"
    assert settings_mod.detect_runtime(None) == "auto"
    monkeypatch.delenv("KERAS_HOME")
    assert settings_mod.keras_home() == Path.home() / ".keras"
    monkeypatch.setenv("BRANDMON_IMAGENET_URL", "http://mirror.example/w.h5")
    monkeypatch.setenv("BRANDMON_DETECT_RUNTIME", " TFLite ")
    assert settings_mod.imagenet_mirror() == "http://mirror.example/w.h5"
    assert settings_mod.detect_runtime("onnx") == "tflite"  # the variable wins


def test_secret_env_values(monkeypatch):
    for name in settings_mod.SECRET_ENV:
        monkeypatch.delenv(name, raising=False)
    assert settings_mod.secret_env_values() == []
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-key")
    assert settings_mod.secret_env_values() == ["s3cr3t-key"]


def test_airflow_connection_ids(tmp_path):
    base = {"BRANDMON_HOME": str(tmp_path), "BRANDMON_AUTHOR_SALT": "salt"}
    s = settings_mod.load_settings(env=base)
    assert (s.db_conn_id, s.aws_conn_id) == ("brandmon_db", "brandmon_aws")
    s = settings_mod.load_settings(env={**base, "BRANDMON_DB_CONN_ID": "warehouse", "BRANDMON_AWS_CONN_ID": "lake"})
    assert (s.db_conn_id, s.aws_conn_id) == ("warehouse", "lake")


def test_workdir_settings_ignore_brandmon_vars_but_the_salt(monkeypatch, tmp_path):
    cfg = tmp_path / "brandmon.yaml"
    cfg.write_text("brands:\n  - {name: Acme}\n")
    monkeypatch.setenv("BRANDMON_DATABASE_URL", "postgresql+psycopg2://u:p@elsewhere/db")
    monkeypatch.setenv("BRANDMON_STORAGE_URL", "s3://elsewhere/lake")
    monkeypatch.setenv("BRANDMON_AUTHOR_SALT", "inherited-salt")
    s = settings_mod.workdir_settings(tmp_path, cfg)
    assert s.database_url == f"sqlite:///{tmp_path / 'brandmon.db'}"
    assert s.storage_url == (tmp_path / "lake").as_uri()
    assert s.home == tmp_path / "var"
    assert s.author_salt.get() == "inherited-salt"
    assert [b.name for b in s.brands] == ["Acme"]
    monkeypatch.delenv("BRANDMON_AUTHOR_SALT")
    salted = settings_mod.workdir_settings(tmp_path, cfg).author_salt.get()
    assert salted != "inherited-salt" and (tmp_path / "var" / "author_salt").read_text().strip() == salted


def test_option_lists_have_one_reader():
    assert settings_mod.str_list(None, "x") == ()
    assert settings_mod.str_list("a", "x") == ("a",)
    assert settings_mod.str_list(["a", 2], "x") == ("a", "2")
    with pytest.raises(ConfigError, match="^sources: must be a list of strings, got dict$"):
        settings_mod.str_list({"a": 1}, "sources:")
