"""`brandmon status`: what is configured, whether the stores answer, what ran last."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import BrandmonError
from pipeline.redact import scrub_text
from pipeline.settings import load_settings


def collect_status() -> dict[str, Any]:
    """Gather a status report; each failing part is reported, not raised."""
    from pipeline import schema
    from pipeline.aggregate.mentions import active_model
    from pipeline.context import Context
    from pipeline.database import check_connection, current_revision, head_revision
    from pipeline.runlog import recent_runs

    settings = load_settings()
    report: dict[str, Any] = {"settings": settings.describe(), "ok": True, "problems": []}
    ctx = Context(settings)
    try:
        check_connection(ctx.engine)
        rev = current_revision(ctx.engine)
        report["schema"] = {"current": rev, "head": head_revision()}
        if rev != head_revision():
            raise BrandmonError("schema is not current; run `brandmon db upgrade`")
        with ctx.engine.connect() as conn:
            report["rows"] = {
                t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in (schema.posts, schema.post_images, schema.images, schema.detections,
                          schema.text_mentions, schema.mention_daily, schema.quarantine, schema.runs)
            }
            active = active_model(conn)
        report["active_model"] = active.version
        report["warnings"] = _model_warnings(settings, active)
        report["recent_runs"] = [
            {k: r[k] for k in ("id", "kind", "source", "window_start", "status", "counts", "error")}
            for r in recent_runs(ctx.engine, 10)
        ]
    except BrandmonError as exc:
        report["ok"] = False
        report["problems"].append(str(exc))
    except SQLAlchemyError as exc:  # e.g. a role without privileges on the tables
        report["ok"] = False
        orig = getattr(exc, "orig", None) or exc
        reason = (str(orig).strip().splitlines() or [type(orig).__name__])[0]
        report["problems"].append(
            f"the database refused to read brandmon's tables: {scrub_text(reason)}; grant this role SELECT "
            "on them (or connect as the role that ran `brandmon db upgrade`)"
        )
    try:
        ctx.store.check()
        report["lake"] = "ok"
    except BrandmonError as exc:
        report["ok"] = False
        report["lake"] = "unavailable"
        report["problems"].append(str(exc))
    ctx.close()
    # problems and run errors may quote a URL or a driver's message: one redactor for all of them
    report["problems"] = [scrub_text(p) for p in report["problems"]]
    for run in report.get("recent_runs", []):
        if run.get("error"):
            run["error"] = scrub_text(run["error"])
    return report


def _model_warnings(settings: Any, active: Any) -> list[str]:
    """Active-model classes that match no catalogue brand or product (their detections count
    for nothing): see `pipeline.aggregate.catalogue.map_classes`."""
    if active.version is None:
        return []
    from pipeline.aggregate.catalogue import map_classes, unmatched_warning

    _, unmatched = map_classes(active.classes, settings.brands)
    warning = unmatched_warning(active.version, unmatched)
    return [warning] if warning else []


def _warning(run: dict[str, Any]) -> str:
    """A succeeded run's warning (e.g. an ingest window that stored nothing from what it fetched)."""
    counts = run.get("counts")
    warning = counts.get("warning") if isinstance(counts, dict) else None
    return f"WARNING: {warning}" if warning else ""


def _detect_figures(run: dict[str, Any]) -> str:
    """What a detect run scored and how: runtime, precision, images scored (and re-scored by
    the int8 precision cascade), so the text report answers "which runtime ran" as --json does."""
    counts = run.get("counts")
    if run.get("kind") != "detect" or not isinstance(counts, dict) or "runtime" not in counts:
        return ""
    text = f"{str(counts['runtime'])[:20]} {str(counts.get('precision', '?'))[:20]}, {counts.get('scored', 0)} scored"
    if "rescored" in counts:
        text += f", {counts['rescored']} re-scored"
    if "seconds" in counts:
        text += f" in {counts['seconds']}s"
    return text


def format_status(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"database : {s['database_url']}",
        f"lake     : {s['storage_url']}" + (f" (endpoint {s['s3_endpoint_url']})" if s["s3_endpoint_url"] else ""),
        f"config   : {s['config'] or '(none: BRANDMON_CONFIG unset)'}",
        f"brands   : {', '.join(s['brands']) or '-'}",
        f"sources  : {', '.join(s['sources']) or '-'}",
    ]
    if "schema" in report:
        lines.append(f"schema   : {report['schema']['current']} (code needs {report['schema']['head']})")
    if "rows" in report:
        lines.append("rows     : " + ", ".join(f"{k}={v}" for k, v in report["rows"].items()))
        lines.append(f"model    : {report.get('active_model') or '(no active model)'}")
    for run in report.get("recent_runs", []):
        window = run["window_start"].date().isoformat() if run["window_start"] else "-"
        lines.append(f"run {run['id']:>5} {run['kind']:<9} {run['source'] or '-':<12} {window:<10} {run['status']:<9} "
                     f"{run['error'] or _warning(run) or _detect_figures(run)}")
    for warning in report.get("warnings", []):
        lines.append(f"WARNING  : {warning}")
    for problem in report["problems"]:
        lines.append(f"PROBLEM  : {problem}")
    return "\n".join(lines)
