"""The model registry: one `model_versions` row per trained model, one active version.

Artifacts are content-addressed in the object store (`models/artifacts/<sha256>.zip`), so two
trainings racing for the same version number can never overwrite each other's weights; the
row insert decides who gets the number and the loser takes the next one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.context import Context
from pipeline.errors import BrandmonError
from pipeline.schema import model_versions, utcnow

log = logging.getLogger(__name__)


def _row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A registry row with `metrics` always a mapping: a hand-edited or corrupt metrics value
    (a string, a list) is read as empty with a warning naming the version, so `status`,
    `aggregate`, `model list` and `train` keep working instead of failing on it."""
    out = dict(row)
    metrics = out.get("metrics")
    if metrics is not None and not isinstance(metrics, Mapping):
        log.warning("model %s: its stored metrics are a %s, not a JSON object; read as empty (re-register "
                    "or re-train the model to restore them)", out.get("version"), type(metrics).__name__)
        metrics = None
    out["metrics"] = dict(metrics or {})
    return out

_VERSION = re.compile(r"^v(\d+)$")
ACTIVATE_ATTEMPTS = 5


class UnknownModel(BrandmonError):
    """A model version that is not in the registry (or none is active)."""


def _next_version(conn: Any) -> str:
    numbers = [int(m.group(1)) for (v,) in conn.execute(select(model_versions.c.version)) if (m := _VERSION.match(v))]
    return f"v{max(numbers, default=0) + 1}"


def register(
    ctx: Context, spec: Any, artifact: bytes, data_fingerprint: str, metrics: dict[str, Any], params: dict[str, Any]
) -> str:
    """Store the artifact and insert the version row (inactive); returns the version name."""
    key = f"models/artifacts/{hashlib.sha256(artifact).hexdigest()}.zip"
    if not ctx.store.exists(key):
        ctx.store.put(key, artifact, content_type="application/zip")
    for _attempt in range(20):
        try:
            with ctx.engine.begin() as conn:
                version = _next_version(conn)
                conn.execute(
                    model_versions.insert().values(
                        version=version,
                        created_at=utcnow(),
                        classes=list(spec.classes),
                        base=spec.base,
                        weights=spec.weights,
                        input_size=spec.input_size,
                        data_fingerprint=data_fingerprint,
                        metrics=metrics,
                        threshold=float(spec.threshold),
                        artifact_key=key,
                        params=params,
                        active=False,
                    )
                )
            return version
        except IntegrityError:
            continue
    raise BrandmonError("could not allocate a model version number (20 concurrent registrations?)")


def list_versions(ctx: Context) -> list[dict[str, Any]]:
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(model_versions).order_by(model_versions.c.created_at)).mappings().all()
    return sorted((_row(r) for r in rows), key=lambda r: (int(m.group(1)) if (m := _VERSION.match(r["version"])) else 0, r["created_at"]))


def get_version(ctx: Context, version: str) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        row = conn.execute(select(model_versions).where(model_versions.c.version == version)).mappings().first()
    if row is None:
        known = ", ".join(r["version"] for r in list_versions(ctx)) or "none; run `brandmon train`"
        raise UnknownModel(f"no model version {version!r} (known: {known})")
    return _row(row)


def active_row(conn: Connection) -> dict[str, Any] | None:
    """The active version's row, or None: the one rule every reader of "the active model" uses.

    The database holds at most one (migration 0008's partial unique index); the order is only
    a tie-break for a database that has not been upgraded yet: the newest wins.
    """
    row = conn.execute(
        select(model_versions)
        .where(model_versions.c.active.is_(True))
        .order_by(model_versions.c.created_at.desc(), model_versions.c.version.desc())
        .limit(1)
    ).mappings().first()
    return _row(row) if row else None


def active_version(ctx: Context) -> dict[str, Any] | None:
    """`active_row` on a connection of its own."""
    with ctx.engine.connect() as conn:
        return active_row(conn)


def activate(ctx: Context, version: str) -> None:
    """Make `version` the only active version, and mark dirty the days whose image mentions
    that changes: every day with an image scored by the old or the new version (one
    transaction, so `brandmon aggregate` restates them; activating the active one marks none).
    """
    from pipeline.dirty import mark_days_of_model

    get_version(ctx, version)
    for attempt in range(ACTIVATE_ATTEMPTS):
        try:
            with ctx.engine.begin() as conn:
                # Lock every version row in one order first (Postgres): concurrent activations
                # then run one after the other instead of deadlocking on each other's rows.
                conn.execute(select(model_versions.c.version).order_by(model_versions.c.version).with_for_update()).all()
                before = [v for (v,) in conn.execute(select(model_versions.c.version).where(model_versions.c.active.is_(True)))]
                conn.execute(update(model_versions).where(model_versions.c.active.is_(True)).values(active=False))
                conn.execute(update(model_versions).where(model_versions.c.version == version).values(active=True))
                if before != [version]:
                    mark_days_of_model(conn, [*before, version], reason=f"activate {version}")
            return
        except IntegrityError:
            # A concurrent activation committed another active row between our two updates:
            # the unique index refused the second one; start over (the last one wins).
            if attempt == ACTIVATE_ATTEMPTS - 1:
                raise BrandmonError(f"could not activate {version}: {ACTIVATE_ATTEMPTS} concurrent activations") from None


def promote(ctx: Context, version: str, policy: str, baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply `policy` (`always`, `never`, `if_better`) to a registered version; returns the record
    of the decision (`promoted`, `reason`; for `if_better` both models' figures and the rule, see
    `promotion`), which is also stored in the version's `metrics.promotion` so a user sees why.

    `baseline`: the active model's figures on the new model's validation split (train scores it
    there, so both sets of figures come from the same photos); without it the active model's
    recorded figures (its own, older split) stand in, and the record says so.
    """
    from pipeline.detector import promotion

    if policy not in ("always", "never", "if_better"):
        raise BrandmonError(f"activate must be if_better, always or never, not {policy!r}")
    current = active_version(ctx)
    if policy == "never":
        record: dict[str, Any] = {"policy": policy, "promoted": False, "reason": "--activate never: registered only"}
    elif policy == "always" or current is None:
        why = "--activate always" if policy == "always" else "no active model yet"
        record = {"policy": policy, "promoted": True, "reason": why}
    else:
        row = get_version(ctx, version)
        metrics = row["metrics"] or {}
        new = promotion.recorded_figures(row)
        new["source"] = "its validation split" if new["source"].endswith("validation split") else new["source"]
        old = baseline if baseline is not None and baseline.get("version") == current["version"] else None
        if old is None:
            old = promotion.recorded_figures(current)
        record = promotion.compare(new, old, float(metrics.get("target_precision") or 0.9))
    if record["promoted"]:
        activate(ctx, version)
    record_metric(ctx, version, "promotion", record)
    return record


def maybe_activate(ctx: Context, version: str, policy: str, baseline: dict[str, Any] | None = None) -> bool:
    """`promote`, answering only whether `version` is now active."""
    return bool(promote(ctx, version, policy, baseline)["promoted"])


def record_metric(ctx: Context, version: str, key: str, value: Any) -> None:
    """Add (or replace) one key of a version's `metrics` (JSON), e.g. the promotion decision."""
    with ctx.engine.begin() as conn:
        row = conn.execute(select(model_versions.c.metrics).where(model_versions.c.version == version)).first()
        if row is None:
            raise UnknownModel(f"no model version {version!r}")
        conn.execute(update(model_versions).where(model_versions.c.version == version)
                     .values(metrics={**(row.metrics if isinstance(row.metrics, Mapping) else {}), key: value}))


_LOADED: dict[tuple[str, str, str], Any] = {}


def load_model(
    ctx: Context, version: str | None = None, precision: str = "fp32", with_matcher: bool = True, runtime: str = "keras"
) -> Any:
    """The model of `version` (default: the active one), cached per process.

    `runtime`: `keras`, an export format, or `auto` (`runtimes.choose_runtime`: the fastest
    installed runtime with an export of this model, else Keras). `loaded.runtime` says which.
    """
    from pipeline.detector.model import load_artifact
    from pipeline.detector.runtimes import (
        RuntimeUnavailable,
        check_export_matches,
        choose_runtime,
        export_key,
        open_export,
    )

    row = get_version(ctx, version) if version else active_version(ctx)
    if row is None:
        raise UnknownModel("no active model; train one (`brandmon train`) or `brandmon model activate V`")
    chosen = choose_runtime(ctx, row["artifact_key"], runtime, version=row["version"])
    cache = (ctx.store.url, row["artifact_key"], f"{precision}:{with_matcher}:{chosen}")
    if cache not in _LOADED:
        try:
            data = ctx.store.get(row["artifact_key"])
        except KeyError:
            raise UnknownModel(f"model {row['version']}: artifact {row['artifact_key']} is missing from the lake") from None
        _LOADED.clear()  # one model in memory at a time is plenty
        loaded = None
        if chosen != "keras":
            loaded = load_artifact(data, precision=precision, with_matcher=with_matcher, with_network=False)
            try:
                loaded.exported = open_export(ctx.store.get(export_key(row["artifact_key"], chosen)),
                                              threads=ctx.settings.detector.threads, precision=precision)
                check_export_matches(loaded.exported.meta, chosen, loaded.spec, row["artifact_key"], row["version"])
            except RuntimeUnavailable as exc:
                if runtime != "auto":  # a runtime the user forced: its failure is the answer
                    raise
                # auto: a damaged export must not stop the nightly run; Keras scores it (slower),
                # the run log records `keras`, and this warning says what to do
                log.warning("model %s: its %s export cannot be used (%s); scoring with Keras: export it again "
                            "(`brandmon model export %s --format %s`)", row["version"], chosen, exc, row["version"], chosen)
                loaded, chosen = None, "keras"
                cache = (ctx.store.url, row["artifact_key"], f"{precision}:{with_matcher}:{chosen}")
            else:
                loaded.runtime = chosen
                loaded.precision = loaded.exported.precision
        if loaded is None:
            loaded = load_artifact(data, precision=precision, with_matcher=with_matcher)
        _LOADED[cache] = loaded
    loaded = _LOADED[cache]
    loaded.version = row["version"]
    # The registry row is authoritative for the decision threshold (an operator may adjust it).
    loaded.spec.threshold = float(row["threshold"])
    if loaded.spec.extra.get("signal") and "thresholds" in loaded.spec.extra:
        loaded.spec.extra["thresholds"][loaded.spec.extra["signal"]] = float(row["threshold"])
    return loaded
