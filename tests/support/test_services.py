"""tests/support/services.py (the throwaway Postgres and S3 servers): finding Postgres binaries of any version."""

from __future__ import annotations

from pathlib import Path

from tests.support.services import pg_bin_dirs


def test_postgres_binaries_of_any_version_newest_first(tmp_path: Path) -> None:
    for version in ("9.6", "15", "17", "16"):
        (tmp_path / version / "bin").mkdir(parents=True)
    (tmp_path / "README").write_text("not a version")
    assert [d.parent.name for d in pg_bin_dirs(tmp_path)] == ["17", "16", "15", "9.6"]
    assert pg_bin_dirs(tmp_path / "absent") == []
