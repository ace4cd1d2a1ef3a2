"""What an outside tester found after the issue-11 fixes (CLI and operations), through the real
`brandmon` command: each test failed on the code before its fix.

Secrets that still leaked (a password with an unencoded `@`, a mistyped database URL, the
Basic-auth form of a webhook's userinfo), files written through a symlink planted in an
export folder, a YAML nested too deep, and a config listing none of the stored brands.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_reliability_hostile_cli import brandmon

SECRET = "Zq7OUTSIDE"


def _bare_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {**os.environ, "BRANDMON_HOME": str(tmp_path / "var"), "BRANDMON_AUTHOR_SALT": "s" * 16,
           "BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "BRANDMON_STORAGE_URL": (tmp_path / "lake").as_uri(),
           **variables}
    env.pop("BRANDMON_CONFIG", None)
    return env


# --- secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"postgresql://brandmon:pa@{SECRET}/wo#rd@127.0.0.1:1/db",  # an `@` then `/`: the tail became the host
    f"postgresql+psycopg2://brandmon:p#ss@{SECRET}/rd?x=1%@127.0.0.1:1/db",
    f"postgresql:/brandmon:{SECRET}@127.0.0.1:1/db",  # one slash missing
    f"postgresql//brandmon:{SECRET}@127.0.0.1:1/db",
    f"postgresql+psycopg2:://brandmon:{SECRET}@127.0.0.1:1/db",
    f"brandmon:{SECRET}@127.0.0.1:1/db",  # no scheme at all
], ids=["at-then-slash", "hash-at-query", "one-slash", "no-colon", "double-colon", "no-scheme"])
def test_a_database_url_pasted_carelessly_never_shows_its_password(url, tmp_path, tally):
    """(Before: `status` and every command printed the password's tail, re-encoded by SQLAlchemy
    (`bm:***@Zq7OUTSIDE%2Fwo%23rd...`) or the whole mistyped URL with its password.)"""
    env = _bare_env(tmp_path, BRANDMON_DATABASE_URL=url)
    out = ""
    for args in (["status"], ["-vv", "status"], ["db", "upgrade"], ["trends", "--brand", "Acme", "--start", "2026-10-01",
                                                                     "--end", "2026-10-02"]):
        proc = brandmon(env, *args, timeout=90)
        out += proc.stdout + proc.stderr
        if args[0] != "-vv":
            assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert proc.returncode != 0, proc.stdout
    tally.secret_scan(1, len(out), out.count(SECRET))
    assert SECRET not in out, out[-3000:]
    assert "***" in out
