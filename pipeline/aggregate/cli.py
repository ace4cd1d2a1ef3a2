"""`brandmon aggregate | trends | report`: the aggregate commands of the CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

from pipeline.aggregate.daily import SOURCES
from pipeline.errors import BrandmonError


def _date(value: str) -> dt.date:
    from pipeline.dates import BadDate, parse_day

    try:
        return parse_day(value)
    except BadDate as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_aggregate(args: argparse.Namespace) -> int:
    from pipeline.aggregate.jobs import aggregate_dirty, aggregate_range
    from pipeline.context import open_context

    if (args.start is None) != (args.end is None):
        raise BrandmonError("give both --start and --end (or neither, to recompute the dirty days)")
    if args.start is not None and args.end < args.start:
        raise BrandmonError(f"--end {args.end} is before --start {args.start}")
    ctx = open_context()
    try:
        if args.start is None:
            result = aggregate_dirty(ctx, progress=not args.quiet, allow_empty_catalogue=args.allow_empty_catalogue)
        else:
            result = aggregate_range(ctx, args.start, args.end, progress=not args.quiet,
                                     allow_empty_catalogue=args.allow_empty_catalogue)
    finally:
        ctx.close()
    print(json.dumps(result, default=str) if args.json else
          f"aggregated {result['days']} day(s): {result['rows_changed']} row(s) changed, signals of "
          f"{result['followers']} following day(s) refreshed; model {result['model_version'] or 'none'}")
    if result.get("unmatched_classes") and not args.json:
        print(f"warning: {result['unmatched_classes']} class(es) of the active model match no catalogue "
              "brand or product (see `brandmon status`)", file=sys.stderr)
    return 0


def cmd_trends(args: argparse.Namespace) -> int:
    from pipeline.aggregate.trends import daily_series, format_series, plot_series
    from pipeline.context import open_context
    from pipeline.database import require_schema

    ctx = open_context(check=False)  # the lake is not needed to read a series
    require_schema(ctx.engine)
    try:
        series = daily_series(ctx, args.brand, args.start, args.end, product=args.product,
                              platform=args.platform, source=args.source)
    finally:
        ctx.close()
    if args.plot:
        title = f"{args.brand}" + (f" / {args.product}" if args.product != "*" else "") + \
            (f" on {args.platform}" if args.platform != "*" else "") + f" ({args.source})"
        try:
            plot_series(series, args.plot, title)
        except OSError as exc:
            raise BrandmonError(f"cannot write the plot to {args.plot}: {exc.strerror or exc}") from None
        print(f"plot written to {args.plot}", file=sys.stderr)
    print(format_series(series, args.format))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.aggregate.jobs import write_report
    from pipeline.context import open_context

    ctx = open_context()
    try:
        key = write_report(ctx, args.date)
        print(f"report written to {ctx.store.url.rstrip('/')}/{key}")
    finally:
        ctx.close()
    return 0


def register(subparsers) -> None:
    agg = subparsers.add_parser(
        "aggregate",
        help="recompute daily mention aggregates (default: the days touched since the last run)",
        description=(
            "Recompute mention_daily. Without dates: exactly the days marked dirty by ingestion "
            "and detection. With --start/--end: every day of that inclusive range (e.g. after "
            "changing the brand catalogue). Re-running changes nothing."
        ),
    )
    agg.add_argument("--start", type=_date, help="first UTC day (YYYY-MM-DD)")
    agg.add_argument("--end", type=_date, help="last UTC day, inclusive (YYYY-MM-DD)")
    agg.add_argument("--quiet", action="store_true", help="no progress bar")
    agg.add_argument("--json", action="store_true", help="print the run counts as JSON")
    agg.add_argument("--allow-empty-catalogue", action="store_true",
                     help="let a config that lists no brands remove the brands (and their mentions and "
                          "daily counts) the database holds; without BRANDMON_CONFIG the stored catalogue is used")
    agg.set_defaults(func=cmd_aggregate)

    tr = subparsers.add_parser(
        "trends",
        help="daily mention series of a brand with rolling means, spikes, share of voice",
        description="Print (or plot) the daily series of one brand from mention_daily.",
    )
    tr.add_argument("--brand", required=True, help="brand name from the catalogue (case-insensitive)")
    tr.add_argument("--product", default="*", help="one of the brand's products (default: all)")
    tr.add_argument("--platform", default="*", help="e.g. mastodon, bluesky, reddit (default: all)")
    tr.add_argument("--source", default="any", choices=SOURCES,
                    help="text, image, both (text and image) or any (default)")
    tr.add_argument("--start", type=_date, required=True, help="first UTC day (YYYY-MM-DD)")
    tr.add_argument("--end", type=_date, required=True, help="last UTC day, inclusive (YYYY-MM-DD)")
    tr.add_argument("--format", default="table", choices=("table", "csv", "json"), help="output format")
    tr.add_argument("--plot", metavar="FILE.png", help="also draw counts, rolling mean and spikes to a PNG")
    tr.set_defaults(func=cmd_trends)

    rp = subparsers.add_parser(
        "report",
        help="write a one-page HTML report of a day (charts, spikes, share of voice) to the lake",
    )
    rp.add_argument("--date", type=_date, required=True, help="UTC day (YYYY-MM-DD)")
    rp.set_defaults(func=cmd_report)
