"""The `brandmon` command line.

Each capability registers its own sub-commands from a `cli` module of its package (ingest,
detector, aggregate), so this file only wires them together and turns `BrandmonError` into
one clear line on stderr with a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from pipeline import __version__
from pipeline.errors import SHOWN_CHARS, BrandmonError


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from pipeline.context import open_context
    from pipeline.database import upgrade

    ctx = open_context(check=False)
    revision = upgrade(ctx.engine, args.revision)
    ctx.store.check()
    print(f"database at revision {revision}; lake ready at {ctx.store.url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.status import collect_status, format_status

    report = collect_status()
    print(json.dumps(report, indent=2, default=str) if args.json else format_status(report))
    return 0 if report.get("ok") else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(workdir=args.workdir, seed=args.seed, days=args.days, quiet=args.quiet, threads=args.threads)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what is wrong, where the help is), exit 2."""

    def error(self, message: str) -> NoReturn:
        line = " ".join(message.split())
        # argparse echoes a bad value in full ("invalid choice: '...'"): cut each long one (quoted,
        # or a bare word such as an unrecognized argument) to SHOWN_CHARS with an ellipsis
        line = re.sub(rf"'([^']{{{SHOWN_CHARS}}})[^']+'", "'\\1…'", line)
        line = re.sub(rf"(?<!\S)([^\s']{{{SHOWN_CHARS}}})\S+", "\\1…", line)
        self.exit(2, f"{self.prog}: error: {line} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="brandmon",
        description=(
            "Brand-monitoring pipeline: ingest social posts, detect logos in their images, "
            "aggregate daily mentions per brand. Settings come from BRANDMON_* environment "
            "variables and the YAML file named by BRANDMON_CONFIG (see README)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"brandmon {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log to stderr: -v info, -vv debug details"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    db = sub.add_parser("db", help="database schema management")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    up = db_sub.add_parser("upgrade", help="create or migrate the schema (safe to re-run); checks the lake too")
    up.add_argument("--revision", default="head", help="target revision (default: head)")
    up.set_defaults(func=cmd_db_upgrade)

    demo = sub.add_parser(
        "demo",
        help="run the whole pipeline on bundled synthetic data (SQLite + local lake, no network)",
        description=(
            "Build a deterministic synthetic social dataset in WORKDIR, then ingest, detect and "
            "aggregate it on SQLite and a local lake, and print the daily trend per brand. "
            "Re-running it changes nothing."
        ),
    )
    demo.add_argument("--workdir", default="var/demo", help="where the demo's database and lake go (default: var/demo)")
    demo.add_argument("--seed", type=int, default=7, help="generator seed (default: 7)")
    demo.add_argument("--days", type=int, default=30, help="days of synthetic history (default: 30)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.add_argument("--threads", type=int, default=2, choices=range(1, 65), metavar="N",
                      help="TensorFlow threads (default: 2, on any machine; the figures are quoted for 2)")
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser("status", help="settings (secrets hidden), schema revision, lake, recent runs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    # each capability adds its own sub-commands
    from pipeline.aggregate.cli import register as register_aggregate
    from pipeline.alerts.cli import register as register_alerts
    from pipeline.detector.cli import register as register_detector
    from pipeline.ingest.cli import register as register_ingest

    for register in (register_ingest, register_detector, register_aggregate, register_alerts):
        register(sub)
    return parser


TF_COMMANDS = {"demo", "detect", "train", "evaluate"}


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with the process's stderr (fd 2) sent to /dev/null meanwhile.

    Why: TensorFlow 2.21 prints absl's "log messages before absl::InitializeLog()" banner and a
    oneDNN notice from C++ while it loads, before TF_CPP_MIN_LOG_LEVEL applies; a command-line
    user sees them on every run. A failed import still raises its Python exception afterwards
    (and `-vv` skips this, showing everything).
    """
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            # a failed import is reported by the command's own import, with stderr back
            with contextlib.suppress(Exception):
                import tensorflow  # noqa: F401
        finally:
            os.close(devnull)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class RedactingFormatter(logging.Formatter):
    """Log lines with URLs' passwords, secret parameters and `password=...` pairs hidden."""

    def format(self, record: logging.LogRecord) -> str:
        from pipeline.redact import scrub_text

        return scrub_text(super().format(record))


def _say_error(message: str) -> None:
    """One line on stderr, secrets hidden (a message may quote a URL or a driver's text)."""
    from pipeline.redact import scrub_text

    line = " ".join(scrub_text(str(message)).split()) or "failed"
    with contextlib.suppress(OSError, ValueError):
        print(f"brandmon: error: {line}", file=sys.stderr)


def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip()
    return text.splitlines()[0] if text else type(orig).__name__


def _quiet_broken_pipe() -> int:
    """The reader went away (`brandmon trends ... | head -1`): stop quietly, as unix tools do.
    stdout is pointed at /dev/null so the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipeline.settings import quiet_native_logs

    quiet_native_logs()
    levels = {0: logging.WARNING, 1: logging.INFO}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=levels.get(args.verbose, logging.DEBUG), handlers=[handler])
    if args.verbose == 0:  # off a terminal, progress is a log line now and then (--quiet: none)
        logging.getLogger("pipeline.progress").setLevel(logging.INFO)
    if args.verbose < 2:
        for noisy in ("alembic", "botocore", "urllib3", "tensorflow", "absl"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.command in TF_COMMANDS and args.verbose < 2:
        import_tensorflow_quietly()
    from sqlalchemy.exc import DBAPIError

    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrandmonError as exc:
        _say_error(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        print("brandmon: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return _quiet_broken_pipe()
    except DBAPIError as exc:
        if args.verbose >= 2:
            raise
        _say_error(f"the database refused the operation: {_first_line(exc)}; check BRANDMON_DATABASE_URL, "
                   "the role's privileges and `brandmon status`")
        return 2
    except Exception as exc:  # a bug: one line (with -vv: the traceback, to report it)
        if args.verbose >= 2:
            raise
        _say_error(f"internal error: {type(exc).__name__}: {_first_line(exc)} (a bug; re-run with -vv "
                   "for the traceback and report it)")
        return 70  # EX_SOFTWARE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
