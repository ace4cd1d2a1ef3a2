"""`brandmon alerts test RULE | list`: try a rule's destinations, see what was sent."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from pipeline.errors import BrandmonError

LIST_LIMIT = 10000  # rows `alerts list` prints (newest first)
FIELDS = ("day", "rule", "brand", "product", "platform", "source", "destination", "status", "late", "attempts",
          "sent_at", "last_error")


def _date(value: str) -> dt.date:
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {value!r}") from None


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    payload = row.get("payload") if isinstance(row.get("payload"), dict) else {}
    if all(k in payload for k in ("brand", "product", "platform", "source")):  # a name may hold a '|'
        brand, product, platform, source = (payload[k] for k in ("brand", "product", "platform", "source"))
    else:
        brand, product, platform, source = (row["key"].split("|") + ["", "", "", ""])[:4]
    return {"day": row["day"].isoformat(), "rule": row["rule"], "brand": brand, "product": product,
            "platform": platform, "source": source, "destination": row["destination"], "status": row["status"],
            "late": bool(row["late"]), "attempts": row["attempts"],
            "sent_at": row["sent_at"].isoformat(timespec="seconds") if row["sent_at"] else None,
            "last_error": row["last_error"]}


def format_rows(rows: Sequence[dict[str, Any]], fmt: str) -> str:
    from pipeline.alerts.message import one_line

    flat = [_flat(r) for r in rows]
    if fmt == "json":
        return json.dumps(flat, indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
        w.writeheader()
        for r in flat:
            w.writerow({k: "" if r[k] is None else r[k] for k in FIELDS})
        return buf.getvalue().rstrip("\n")
    if not flat:
        return "no alerts recorded"
    cols = ("day", "rule", "brand", "product", "platform", "destination", "status", "late", "attempts", "sent_at")
    cells = [[("late" if r[c] else "") if c == "late" else ("" if r[c] is None else one_line(str(r[c]))) for c in cols]
             for r in flat]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    errors = [f"  {r['day']} {r['rule']} -> {r['destination']}: {r['last_error']}" for r in flat
              if r["last_error"] and r["status"] != "sent"]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def cmd_alerts_test(args: argparse.Namespace) -> int:
    from pipeline.alerts.jobs import send_test
    from pipeline.context import open_context

    ctx = open_context()
    try:
        results = send_test(ctx, args.rule)
    finally:
        ctx.close()
    for r in results:
        if r["ok"]:
            print(f"{r['destination']} ({r['kind']}): test message sent ({r['requests']} request(s), {r['seconds']} s)")
        else:
            print(f"{r['destination']} ({r['kind']}): FAILED: {r['error']}", file=sys.stderr)
    failed = [r["destination"] for r in results if not r["ok"]]
    if failed:
        raise BrandmonError(f"test message not delivered to {', '.join(failed)} (see above)")
    return 0


def cmd_alerts_list(args: argparse.Namespace) -> int:
    from pipeline.alerts.jobs import list_alerts
    from pipeline.context import open_context
    from pipeline.database import require_schema

    ctx = open_context(check=False)  # the lake is not needed to read the ledger
    require_schema(ctx.engine)
    try:
        rows = list_alerts(ctx, since=args.since, status=args.status, limit=LIST_LIMIT)
    finally:
        ctx.close()
    print(format_rows(rows, args.format))
    if len(rows) >= LIST_LIMIT:
        print(f"note: only the newest {LIST_LIMIT} alerts are shown; narrow with --since or --status", file=sys.stderr)
    return 0


def register(subparsers) -> None:
    al = subparsers.add_parser(
        "alerts",
        help="alert rules: send a test message, list what was sent",
        description="Alerts are sent by `brandmon aggregate` (and the brandmon_aggregate DAG) once per rule, "
                    "day and key; configure them under `alerts:` in the YAML file (see README).",
    )
    sub = al.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    t = sub.add_parser("test", help="send a sample message of RULE to its destinations (not recorded)")
    t.add_argument("rule", help="the rule's name")
    t.set_defaults(func=cmd_alerts_test)
    ls = sub.add_parser("list", help="alerts recorded in the ledger: sent, failed, skipped")
    ls.add_argument("--since", type=_date, help="first day (YYYY-MM-DD) of the alerts shown")
    ls.add_argument("--status", choices=("sending", "sent", "failed", "skipped"), help="only this status")
    ls.add_argument("--format", default="table", choices=("table", "csv", "json"), help="output format")
    ls.set_defaults(func=cmd_alerts_list)
