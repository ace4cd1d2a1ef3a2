"""Database access: engines, migrations, and dialect-aware bulk upserts.

The pipeline runs the same SQL on SQLite (the embedded default) and Postgres; the few places
where dialects differ (upsert syntax, COPY) are kept here so business code stays portable.
"""

from __future__ import annotations

import io
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DatabaseError as SADatabaseError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import ProgrammingError as SAProgrammingError

from pipeline.errors import DatabaseError
from pipeline.redact import redact_url, scrub_text

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, **kwargs: Any) -> Engine:
    """An engine with the settings each backend needs for concurrent pipeline runs."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 60}, **kwargs)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            # Take transaction control from pysqlite so `engine.begin()` means a real transaction.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn) -> None:
            # IMMEDIATE takes the write lock up front: two writers queue instead of deadlocking.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    _SHOWN_URL[engine] = redact_url(url)
    rest = url.split("://", 1)[-1]
    at = rest.rfind("@")
    colon = rest.find(":", 0, at) if at >= 0 else -1
    _PASSWORDS[engine] = rest[colon + 1 : at] if colon >= 0 else ""
    return engine


# The URL as configured, redacted, for messages. SQLAlchemy's own rendering of a URL whose
# password holds unencoded `@` or `/` percent-encodes those, so the redactor could no longer
# tell where the password ends and would show its tail.
_SHOWN_URL: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()
_PASSWORDS: weakref.WeakKeyDictionary[Engine, str] = weakref.WeakKeyDictionary()


def shown_url(engine: Engine) -> str:
    """The engine's URL as the user wrote it, with its secrets hidden."""
    shown = _SHOWN_URL.get(engine)
    if shown is None:
        shown = redact_url(engine.url.render_as_string(hide_password=False))
    return shown


def check_connection(engine: Engine, source: str = "BRANDMON_DATABASE_URL") -> None:
    """Fail with one clear line if the database cannot be reached, naming `source` (the
    variable or Airflow connection the URL came from) as what to fix."""
    try:
        with engine.connect() as conn:
            conn.execute(text("select 1"))
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "connection failed"
        raise DatabaseError(
            f"cannot reach the database at {shown_url(engine)}: "
            f"{_scrub(reason, engine)}; start it or fix {source}"
        ) from None
    except SADatabaseError as exc:  # e.g. sqlite: "file is not a database", raised by the pragmas
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else "not a database"
        if engine.url.get_backend_name() == "sqlite":
            raise DatabaseError(
                f"{engine.url.database} is not a SQLite database ({_scrub(reason, engine)}); point "
                "BRANDMON_DATABASE_URL at a brandmon database file, or at a new path to create one"
            ) from None
        raise DatabaseError(
            f"the database at {shown_url(engine)} answered "
            f"with an error: {_scrub(reason, engine)}; fix BRANDMON_DATABASE_URL"
        ) from None


def _scrub(message: str, engine: Engine) -> str:
    password = engine.url.password
    secrets = [str(password)] if password else []
    if raw := _PASSWORDS.get(engine):  # as written, unencoded `@`, `/`, `#` and all
        secrets = [raw, *(p for p in raw.replace("#", "@").replace("/", "@").split("@") if len(p) >= 4), *secrets]
    return scrub_text(message, secrets)


def _alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply migrations up to `revision`; returns the revision the database is now at."""
    from alembic import command

    check_connection(engine)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), revision)
    return current_revision(engine) or "base"


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def require_schema(engine: Engine, source: str = "BRANDMON_DATABASE_URL") -> None:
    """Refuse to run against a database whose schema is missing or behind the code."""
    check_connection(engine, source)
    try:
        current = current_revision(engine)
    except (OperationalError, SAProgrammingError) as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else ""
        if "permission denied" in reason.lower():
            raise DatabaseError(
                f"the database refused to read brandmon's tables: {_scrub(reason, engine)}; grant this role "
                "SELECT (and for writing commands INSERT, UPDATE, DELETE) on them, or connect as their owner"
            ) from None
        current = None
    if current != head_revision():
        state = "has no brandmon schema" if current is None else f"is at revision {current}"
        raise DatabaseError(f"the database {state}, the code needs {head_revision()}; run `brandmon db upgrade`")


def table_names(engine: Engine) -> set[str]:
    return set(inspect(engine).get_table_names())


# --- bulk writes -----------------------------------------------------------------------------


def chunks(rows: Sequence[dict[str, Any]] | Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _insert(conn: Connection, table: Table):
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


def upsert(
    conn: Connection,
    table: Table,
    rows: Sequence[dict[str, Any]],
    keys: Sequence[str],
    update: Sequence[str] | None = None,
    chunk_size: int = 1000,
) -> int:
    """Insert rows; on a key conflict update `update` columns (None: all non-key columns).

    `update=()` makes it insert-or-ignore. Returns the number of rows sent.
    """
    if not rows:
        return 0
    columns = list(rows[0].keys())
    if update is None:
        update = [c for c in columns if c not in keys]
    # SQLite limits bound parameters per statement (32766); keep each statement below it.
    if conn.dialect.name == "sqlite":
        chunk_size = max(1, min(chunk_size, 30000 // max(1, len(columns))))
    sent = 0
    for batch in chunks(rows, chunk_size):
        stmt = _insert(conn, table).values(batch)
        if update:
            stmt = stmt.on_conflict_do_update(
                index_elements=list(keys), set_={c: stmt.excluded[c] for c in update}
            )
        else:
            stmt = stmt.on_conflict_do_nothing(index_elements=list(keys))
        conn.execute(stmt)
        sent += len(batch)
    return sent


def copy_rows(conn: Connection, table_name: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
    """Postgres COPY FROM STDIN (text format) into `table_name`; the fast path for staging tables."""
    buf = io.StringIO()
    n = 0
    for row in rows:
        buf.write("\t".join(_copy_value(v) for v in row))
        buf.write("\n")
        n += 1
    buf.seek(0)
    raw = conn.connection.dbapi_connection
    with raw.cursor() as cur:  # type: ignore[union-attr]
        cur.copy_expert(f"COPY {table_name} ({', '.join(columns)}) FROM STDIN", buf)
    return n


def _copy_value(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    s = value.isoformat() if hasattr(value, "isoformat") else str(value)
    return (
        s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )
