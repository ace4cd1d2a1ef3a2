"""`brandmon aggregate | trends | report`: the aggregate commands of the CLI."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable

from pipeline.aggregate.daily import SOURCES
from pipeline.errors import BrandmonError


def _date(value: str) -> dt.date:
    from pipeline.dates import BadDate, parse_day

    try:
        return parse_day(value)
    except BadDate as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _write_plot(draw: Callable[[str], None], path: str) -> None:
    """Draw a PNG to `path` with `draw(path)`; an unwritable path is one line, not a traceback."""
    try:
        draw(path)
    except OSError as exc:
        raise BrandmonError(f"cannot write the plot to {path}: {exc.strerror or exc}") from None
    print(f"plot written to {path}", file=sys.stderr)


def cmd_aggregate(args: argparse.Namespace) -> int:
    from pipeline.aggregate.jobs import aggregate_dirty, aggregate_range
    from pipeline.context import open_context
    from pipeline.progress import for_cli

    if (args.start is None) != (args.end is None):
        raise BrandmonError("give both --start and --end (or neither, to recompute the dirty days)")
    if args.start is not None and args.end < args.start:
        raise BrandmonError(f"--end {args.end} is before --start {args.start}")
    from pipeline.aggregate.forecast import refresh_forecasts

    ctx = open_context()
    try:
        if args.start is None:
            result = aggregate_dirty(ctx, progress=for_cli(args.quiet), allow_empty_catalogue=args.allow_empty_catalogue)
        else:
            result = aggregate_range(ctx, args.start, args.end, progress=for_cli(args.quiet),
                                     allow_empty_catalogue=args.allow_empty_catalogue)
        if not args.no_forecast:
            result["forecast"] = refresh_forecasts(ctx)
    finally:
        ctx.close()
    print(json.dumps(result, default=str) if args.json else
          f"aggregated {result['days']} day(s): {result['rows_changed']} row(s) changed, signals of "
          f"{result['followers']} following day(s) refreshed; model {result['model_version'] or 'none'}"
          + (f"; forecasts: {result['forecast']['forecasts']} new, {result['forecast']['unchanged']} unchanged, "
             f"{result['forecast']['too_short']} too short" if "forecast" in result else ""))
    if "alerts_fired" in result and not args.json:
        broken = (f"; {result['alerts_errors']} error(s) stopped sending (logged above; the next run retries)"
                  if result.get("alerts_errors") else "")
        print(f"alerts: {result['alerts_sent']} sent, {result['alerts_failed'] + result['alerts_not_tried']} failed "
              f"(retried by the next run), {result['alerts_skipped']} too old to send{broken}; "
              "`brandmon alerts list` shows them")
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
        _write_plot(lambda path: plot_series(series, path, title), args.plot)
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


def cmd_forecast(args: argparse.Namespace) -> int:
    from pipeline.aggregate.forecast import format_forecast, history, make_forecast, plot_forecast
    from pipeline.context import open_context
    from pipeline.database import require_schema

    ctx = open_context(check=False)
    require_schema(ctx.engine)
    try:
        fc = make_forecast(ctx, args.brand, args.product, args.platform, args.horizon, args.end)
        if args.plot:
            rows = history(ctx, fc.brand, fc.product, fc.platform, args.end)[2]
            _write_plot(lambda path: plot_forecast(fc, rows, path), args.plot)
    finally:
        ctx.close()
    print(json.dumps(fc.as_json(), indent=2) if args.json else format_forecast(fc))
    return 0


def cmd_demand(args: argparse.Namespace) -> int:
    from pipeline.aggregate.demand import analyse, format_leadlag, mention_counts, plot_leadlag
    from pipeline.aggregate.sales import read_sales_file, read_sales_table
    from pipeline.context import open_context
    from pipeline.database import require_schema

    if (args.sales is None) == (args.sales_table is None):
        raise BrandmonError("give exactly one of --sales FILE.csv or --sales-table NAME")
    ctx = open_context(check=False)
    require_schema(ctx.engine)
    try:
        if args.sales is not None:
            value, sales = read_sales_file(args.sales, args.column)
        else:
            value, sales = read_sales_table(ctx.engine, args.sales_table, args.column)
        brand, mentions = mention_counts(ctx, args.brand, args.product, args.platform)
    finally:
        ctx.close()
    res = analyse(mentions, sales, brand, value, max_lag=args.max_lag)
    if args.plot:
        _write_plot(lambda path: plot_leadlag(mentions, sales, res, path), args.plot)
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(res), default=str, indent=2))
    else:
        print(format_leadlag(res))
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from pipeline.aggregate.gallery import default_out, export_evidence
    from pipeline.aggregate.trends import resolve_key
    from pipeline.context import open_context

    if args.top < 1:
        raise BrandmonError(f"--top must be at least 1, got {args.top}")
    ctx = open_context()
    try:
        brand, _ = resolve_key(ctx, args.brand)
        out = args.out or default_out(brand, args.date)
        res = export_evidence(ctx, brand, args.date, out, top=args.top, top_review=args.top)
    finally:
        ctx.close()
    print(f"{res['counted']} counted and {res['review']} review image(s) of {brand} on {args.date} "
          f"exported to {res['csv']}" + (f"; {res['missing']} missing from the lake" if res["missing"] else ""))
    return 0


def _brand_options(parser: argparse.ArgumentParser, platform_help: str = "e.g. mastodon (default: all)") -> None:
    """--brand, --product, --platform: which series a command reads."""
    parser.add_argument("--brand", required=True, help="brand name from the catalogue (case-insensitive)")
    parser.add_argument("--product", default="*", help="one of the brand's products (default: all)")
    parser.add_argument("--platform", default="*", help=platform_help)


def _add_aggregate(subparsers) -> None:
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
    agg.add_argument("--no-forecast", action="store_true",
                     help="do not refresh the brands' forecasts in demand_signal afterwards")
    agg.add_argument("--allow-empty-catalogue", action="store_true",
                     help="let a config that lists no brands (or none of the stored ones) remove the brands (and their mentions and "
                          "daily counts) the database holds; without BRANDMON_CONFIG the stored catalogue is used")
    agg.set_defaults(func=cmd_aggregate)


def _add_trends_and_report(subparsers) -> None:
    tr = subparsers.add_parser(
        "trends",
        help="daily mention series of a brand with rolling means, spikes, share of voice",
        description="Print (or plot) the daily series of one brand from mention_daily.",
    )
    _brand_options(tr, "e.g. mastodon, bluesky, reddit (default: all)")
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


def _add_evidence(subparsers) -> None:
    ev = subparsers.add_parser(
        "evidence",
        help="export the photos behind a brand's image mentions of a day (images + evidence.csv)",
        description=(
            "The images the active model counted for BRAND on DATE (best score first) and those "
            "waiting near the threshold in the review queue: originals under DIR/images, copies "
            "with the detection box drawn under DIR/annotated, and DIR/evidence.csv (post url, "
            "platform, score, box, model version, review status). Re-running overwrites the CSV."
        ),
    )
    ev.add_argument("--brand", required=True, help="brand name from the catalogue (case-insensitive)")
    ev.add_argument("--date", type=_date, required=True, help="UTC day (YYYY-MM-DD)")
    ev.add_argument("--out", metavar="DIR", help="output folder (default: ./evidence-BRAND-DATE)")
    ev.add_argument("--top", type=int, default=50, help="at most this many counted and review images (default 50)")
    ev.set_defaults(func=cmd_evidence)


def _add_forecast(subparsers) -> None:
    fc = subparsers.add_parser(
        "forecast",
        help="expected daily mentions ahead with 95%% prediction intervals, backtested against seasonal naive",
        description=(
            "Exponential smoothing with weekly seasonality (statsmodels ETS) on the brand's daily posts "
            "(any source) from its first to its last aggregated day; a rolling-origin backtest reports "
            "MAE and MASE against the seasonal-naive forecast. Histories under three weeks are not forecast."
        ),
    )
    _brand_options(fc)
    fc.add_argument("--horizon", type=int, default=28, help="days ahead (default 28)")
    fc.add_argument("--end", type=_date, help="last day of history to use (default: the last aggregated day)")
    fc.add_argument("--json", action="store_true", help="print the forecast as JSON")
    fc.add_argument("--plot", metavar="FILE.png", help="also draw history, forecast and interval to a PNG")
    fc.set_defaults(func=cmd_forecast)


def _add_demand(subparsers) -> None:
    dm = subparsers.add_parser(
        "demand",
        help="do mentions lead sales? cross-correlation at lags 0-42, best lead, lagged regression",
        description=(
            "Relate a brand's daily mentions to its sales (CSV with columns date and units or revenue, "
            "or a table with those columns in the brandmon database): cross-correlation of the "
            "detrended series at lags 0..42 days with Bartlett bands and a permutation test, the best "
            "lead, and a regression of sales on lagged mentions with its out-of-sample error against "
            "a naive forecast."
        ),
    )
    _brand_options(dm)
    dm.add_argument("--sales", metavar="FILE.csv", help="CSV: date,units (or date,revenue), one row per day")
    dm.add_argument("--sales-table", metavar="NAME", help="a table in the same database with those columns")
    dm.add_argument("--column", choices=("units", "revenue"), help="value column when both are present (default units)")
    dm.add_argument("--max-lag", type=int, default=42, help="longest lead tried, days (default 42)")
    dm.add_argument("--plot", metavar="FILE.png", help="plot both series aligned at the best lead")
    dm.add_argument("--json", action="store_true", help="print the result as JSON")
    dm.set_defaults(func=cmd_demand)


def register(subparsers) -> None:
    """The aggregate commands, in the order `brandmon --help` lists them."""
    for add in (_add_aggregate, _add_trends_and_report, _add_evidence, _add_forecast, _add_demand):
        add(subparsers)
