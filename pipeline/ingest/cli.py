"""`brandmon ingest`, `brandmon backfill` and `brandmon images`: thin wrappers over `jobs`."""

from __future__ import annotations

import argparse
import datetime as dt

from pipeline.dates import BadDate, parse_day, parse_instant
from pipeline.errors import ConfigError
from pipeline.progress import for_cli

ORDER = ("fetched", "new", "updated", "unchanged", "rejected", "duplicates", "superseded", "out_of_window",
         "images_stored", "images_failed", "images_quarantined", "windows", "skipped")


def parse_time_arg(value: str) -> dt.datetime:
    """`2026-10-01`, `2026-10-01T06:00`, `...Z` or with an offset; no zone means UTC."""
    try:
        return parse_instant(value)
    except BadDate as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_date_arg(value: str) -> dt.date:
    try:
        return parse_day(value)
    except BadDate as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_counts(counts: dict[str, int]) -> str:
    keys = [k for k in ORDER if k in counts] + sorted(k for k in counts if k not in ORDER and k != "warning")
    line = " ".join(f"{k}={counts[k]}" for k in keys)
    if counts.get("warning"):
        line += f"\nWARNING: {counts['warning']}"
    elif counts.get("silent_zero"):
        line += (f"\nWARNING: {counts['silent_zero']} window(s) fetched items but stored and quarantined none; "
                 "see `brandmon status` or the log")
    return line


def cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.context import open_context
    from pipeline.ingest.jobs import ingest_window

    if args.end <= args.start:
        raise ConfigError("--end must be after --start (windows are half-open: [start, end))")
    ctx = open_context()
    try:
        counts = ingest_window(ctx, args.source, args.start, args.end, force=args.force, progress=for_cli(args.quiet))
    finally:
        ctx.close()
    if counts.get("skipped"):
        print(f"{args.source} {args.start.isoformat()} .. {args.end.isoformat()}: already complete (use --force to re-run)")
    else:
        print(f"{args.source} {args.start.isoformat()} .. {args.end.isoformat()}: {format_counts(counts)}")
    return 0


def cmd_backfill(args: argparse.Namespace) -> int:
    from pipeline.context import open_context
    from pipeline.ingest.jobs import backfill

    ctx = open_context()
    try:
        counts = backfill(ctx, args.source, args.start, args.end, force=args.force, progress=for_cli(args.quiet), workers=args.workers)
    finally:
        ctx.close()
    print(f"{args.source} {args.start} .. {args.end}: {format_counts(counts)}")
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    from pipeline.context import open_context
    from pipeline.ingest.jobs import fetch_images

    ctx = open_context()
    try:
        counts = fetch_images(ctx, source=args.source, progress=for_cli(args.quiet))
    finally:
        ctx.close()
    print(format_counts(counts))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="ingest one window [start, end) of a source",
        description="Fetch one half-open window of SOURCE, keep the raw responses in the lake, upsert "
        "the posts and fetch their images. A window already complete is skipped unless --force.",
    )
    p.add_argument("source", metavar="SOURCE", help="a source name from the `sources:` config")
    p.add_argument("--start", required=True, type=parse_time_arg, help="window start (ISO; UTC if no zone)")
    p.add_argument("--end", required=True, type=parse_time_arg, help="window end, excluded (ISO; UTC if no zone)")
    p.add_argument("--force", action="store_true", help="re-run even if the window is already complete "
                   "(archive sources: also rebuild the day index from the export)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_ingest)

    b = subparsers.add_parser(
        "backfill",
        help="ingest daily windows of a source between two dates",
        description="Ingest SOURCE one UTC day at a time from --start to --end (both included). Windows "
        "already complete are skipped, so an interrupted backfill resumes where it stopped.",
    )
    b.add_argument("source", metavar="SOURCE", help="a source name from the `sources:` config")
    b.add_argument("--start", required=True, type=parse_date_arg, help="first day (YYYY-MM-DD)")
    b.add_argument("--end", required=True, type=parse_date_arg, help="last day, included (YYYY-MM-DD)")
    b.add_argument("--force", action="store_true", help="re-run windows already complete (archive sources: also "
                   "rebuild the day index from the export, once)")
    b.add_argument("--workers", type=int, default=1, help="windows ingested at once, in separate processes (default: 1)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_backfill)

    i = subparsers.add_parser("images", help="retry pending and failed image downloads")
    i.add_argument("--source", default=None, help="only images of this source's posts")
    i.add_argument("--quiet", action="store_true", help="no progress bar")
    i.set_defaults(func=cmd_images)
