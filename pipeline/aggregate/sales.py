"""A brand's own sales series, from a CSV file or a table in the brandmon database.

Outside data, so bounded and strict: at most `MAX_BYTES` / `MAX_ROWS`, a header with `date`
and `units` or `revenue` (case-insensitive), ISO dates, finite non-negative numbers, one row
per date. Anything else is a `SalesError` with one line naming the file, line and value.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import re
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, column, inspect, select, table

from pipeline.dates import BadDate, check_day
from pipeline.errors import BrandmonError

MAX_BYTES = 20_000_000
MAX_ROWS = 100_000
VALUE_COLUMNS = ("units", "revenue")
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SalesError(BrandmonError):
    """Sales data that cannot be used, with where and why."""


def _value_column(found: list[str], wanted: str | None, where: str) -> str:
    names = [c.strip().casefold() for c in found]
    if "date" not in names:
        raise SalesError(f"{where}: missing column 'date' (found: {', '.join(found) or 'none'})")
    choices = [wanted.casefold()] if wanted else [c for c in VALUE_COLUMNS if c in names]
    if not choices or choices[0] not in names:
        need = f"'{wanted}'" if wanted else "'units' or 'revenue'"
        raise SalesError(f"{where}: missing column {need} (found: {', '.join(found) or 'none'})")
    return choices[0]


def _date(value: Any, where: str) -> dt.date:
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        text = value.isoformat()
    else:
        text = str(value).strip() if value is not None else ""
        try:
            if len(text) != 10:
                raise ValueError
            value = dt.date.fromisoformat(text)
        except ValueError:
            raise SalesError(f"{where}: bad date {text[:40]!r} (use YYYY-MM-DD)") from None
    try:
        return check_day(value, text)
    except BadDate as exc:
        raise SalesError(f"{where}: {exc}") from None


def _number(value: Any, name: str, where: str) -> float:
    text = "" if value is None else str(value).strip()
    try:
        v = float(text) if not isinstance(value, int | float) else float(value)
    except ValueError:
        raise SalesError(f"{where}: {name} is not a number: {text[:40]!r}") from None
    if not math.isfinite(v):
        raise SalesError(f"{where}: {name} is not a finite number: {text[:40]!r}")
    if v < 0:
        raise SalesError(f"{where}: negative {name} {v:g}")
    return v


def collect(rows: Any, name: str, where: str, what: str = "line") -> dict[dt.date, float]:
    """{date: value} from (line number, date, value) triples; errors name `what` and the number."""
    out: dict[dt.date, float] = {}
    first: dict[dt.date, int] = {}
    for k, (line, d_raw, v_raw) in enumerate(rows):
        if k >= MAX_ROWS:
            raise SalesError(f"{where}: more than {MAX_ROWS} rows; give daily totals only")
        d = _date(d_raw, f"{where} {what} {line}")
        v = _number(v_raw, name, f"{where} {what} {line}")
        if d in out:
            raise SalesError(f"{where} {what} {line}: duplicate date {d} (first on {what} {first[d]})")
        out[d], first[d] = v, line
    if not out:
        raise SalesError(f"{where}: no sales rows")
    return dict(sorted(out.items()))


def parse_sales_csv(text: str, where: str = "sales CSV", column_name: str | None = None) -> tuple[str, dict[dt.date, float]]:
    """(value column, {date: value}) from CSV text; blank lines are skipped."""
    if len(text) > MAX_BYTES:
        raise SalesError(f"{where}: larger than {MAX_BYTES} bytes")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)

    def triples() -> Any:
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            yield (reader.line_num, row[di] if di < len(row) else "", row[vi] if vi < len(row) else "")

    try:
        header = next(reader, None)
        if header is None:
            raise SalesError(f"{where}: empty file (expected a header: date,units)")
        name = _value_column(header, column_name, where)
        names = [h.strip().casefold() for h in header]
        di, vi = names.index("date"), names.index(name)
        return name, collect(triples(), name, where)
    except csv.Error as exc:
        raise SalesError(f"{where} line {reader.line_num}: malformed CSV ({exc})") from None


def read_sales_file(path: str | Path, column_name: str | None = None) -> tuple[str, dict[dt.date, float]]:
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise SalesError(f"{p}: cannot read ({exc.strerror or exc})") from None
    if len(data) > MAX_BYTES:
        raise SalesError(f"{p}: larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SalesError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    return parse_sales_csv(text, str(p), column_name)


def read_sales_table(engine: Engine, name: str, column_name: str | None = None) -> tuple[str, dict[dt.date, float]]:
    """(value column, {date: value}) from table `name` (columns date and units or revenue)."""
    if not _IDENT.fullmatch(name):  # fullmatch: `$` alone lets a trailing newline through
        raise SalesError(f"bad table name {name!r} (letters, digits and _ only)")
    insp = inspect(engine)
    if not insp.has_table(name):
        raise SalesError(f"table {name!r} not found in the database")
    cols = [c["name"] for c in insp.get_columns(name)]
    value = _value_column(cols, column_name, f"table {name}")
    real = {c.casefold(): c for c in cols}
    t = table(name, column(real["date"]), column(real[value]))
    q = select(t.c[real["date"]], t.c[real[value]]).order_by(t.c[real["date"]]).limit(MAX_ROWS + 1)
    with engine.connect() as conn:
        rows = conn.execute(q).all()
    return value, collect(((i + 1, d, v) for i, (d, v) in enumerate(rows)), value, f"table {name}", "row")
