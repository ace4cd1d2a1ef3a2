"""The database schema (SQLAlchemy Core), the same on SQLite and Postgres.

Core tables rather than ORM classes: the pipeline moves rows in bulk (COPY / multi-row upserts,
set-based SQL for aggregates), and plain tables keep that explicit. All timestamps are UTC;
`UTCDateTime` makes them timezone-aware on read whatever the backend stores.
Schema changes go through Alembic revisions in `pipeline/migrations/versions/`.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING)

# BIGINT on Postgres, INTEGER on SQLite (so SQLite's rowid autoincrement works).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on both backends (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; attach a timezone")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- catalogue -------------------------------------------------------------------------------

brands = Table(
    "brands",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", String(200), nullable=False, unique=True),
    Column("config", JSON, nullable=False, default=dict),  # keywords, hashtags, aliases, accounts, exclude
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

products = Table(
    "products",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("brand_id", Integer, ForeignKey("brands.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("config", JSON, nullable=False, default=dict),
    UniqueConstraint("brand_id", "name"),
)

sources = Table(
    "sources",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("cursor", JSON, nullable=True),  # connector-specific resume point
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

# --- posts and images ------------------------------------------------------------------------

posts = Table(
    "posts",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("platform", String(32), nullable=False),
    Column("external_id", String(256), nullable=False),
    Column("source", String(128), nullable=False),
    Column("author_hash", String(64), nullable=False),
    Column("text", Text, nullable=False, default=""),
    Column("lang", String(16), nullable=True),
    Column("posted_at", UTCDateTime, nullable=False),
    Column("url", Text, nullable=True),
    Column("repost_of", String(256), nullable=True),  # external id of the original, if a reblog
    Column("content_hash", String(64), nullable=False),  # detects edits: an update changes it
    Column("raw_key", Text, nullable=True),  # lake object holding the raw response
    Column("ingested_at", UTCDateTime, nullable=False, default=utcnow),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    UniqueConstraint("platform", "external_id"),
    Index("ix_posts_posted_at", "posted_at"),
)

images = Table(
    "images",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("storage_key", Text, nullable=False),  # images/sha256/ab/cd/<sha>
    Column("mime", String(64), nullable=False),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("size_bytes", BigInteger, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

post_images = Table(
    "post_images",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("post_id", BigId, ForeignKey("posts.id", ondelete="CASCADE"), nullable=False),
    Column("position", Integer, nullable=False),
    Column("url", Text, nullable=False),
    Column("alt_text", Text, nullable=True),
    Column("sha256", String(64), ForeignKey("images.sha256"), nullable=True),
    Column("status", String(16), nullable=False, default="pending"),  # pending|stored|failed|quarantined
    Column("reason", Text, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    UniqueConstraint("post_id", "position"),
    CheckConstraint("status in ('pending','stored','failed','quarantined')", name="status"),
    Index("ix_post_images_status", "status"),
    Index("ix_post_images_sha256", "sha256"),
)

quarantine = Table(
    "quarantine",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("source", String(128), nullable=False),
    Column("window_start", UTCDateTime, nullable=True),  # NULL: refused while indexing an archive
    Column("kind", String(32), nullable=False),  # record | image | page
    Column("record_ref", String(512), nullable=False),  # stable reference within the window
    Column("reason", Text, nullable=False),
    Column("excerpt", Text, nullable=True),  # truncated, secret-free
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("window_end", UTCDateTime, nullable=True),  # migration 0005: each window owns its rows
    UniqueConstraint("source", "window_start", "window_end", "kind", "record_ref"),
)

# --- detector --------------------------------------------------------------------------------

model_versions = Table(
    "model_versions",
    metadata,
    Column("version", String(64), primary_key=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("classes", JSON, nullable=False),
    Column("base", String(64), nullable=False),  # e.g. inception_v3
    Column("weights", String(256), nullable=False),  # imagenet | none | file:<sha256>
    Column("input_size", Integer, nullable=False),
    Column("data_fingerprint", String(64), nullable=False),
    Column("metrics", JSON, nullable=False, default=dict),
    Column("threshold", Float, nullable=False),
    Column("artifact_key", Text, nullable=False),
    Column("params", JSON, nullable=False, default=dict),
    Column("active", Boolean, nullable=False, default=False),
    # At most one active version (migration 0008); `registry.active_row` reads it.
    Index("uq_model_versions_one_active", "active", unique=True,
          postgresql_where=text("active"), sqlite_where=text("active")),
)

image_scores = Table(
    "image_scores",
    metadata,
    Column("image_sha256", String(64), ForeignKey("images.sha256"), primary_key=True),
    Column("model_version", String(64), ForeignKey("model_versions.version"), primary_key=True),
    Column("status", String(16), nullable=False),  # ok | corrupt
    Column("top_class", String(200), nullable=True),
    Column("top_score", Float, nullable=True),
    Column("reason", Text, nullable=True),
    Column("scored_at", UTCDateTime, nullable=False, default=utcnow),
)

detections = Table(
    "detections",
    metadata,
    Column("image_sha256", String(64), ForeignKey("images.sha256"), primary_key=True),
    Column("model_version", String(64), ForeignKey("model_versions.version"), primary_key=True),
    Column("class_name", String(200), primary_key=True),
    Column("score", Float, nullable=False),
    Column("box", JSON, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_detections_version_class", "model_version", "class_name"),
)

review_queue = Table(
    "review_queue",
    metadata,
    Column("image_sha256", String(64), ForeignKey("images.sha256"), primary_key=True),
    Column("model_version", String(64), ForeignKey("model_versions.version"), primary_key=True),
    Column("class_name", String(200), nullable=False),
    Column("score", Float, nullable=False),
    Column("status", String(16), nullable=False, default="pending"),  # pending|exported|labelled
    Column("label", String(200), nullable=True),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
)

feature_cache = Table(
    "feature_cache",
    metadata,
    Column("cache_key", String(128), primary_key=True),  # base model + input size + preprocessing version
    Column("image_sha256", String(64), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # float16/float32 bytes
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# --- mentions and aggregates -----------------------------------------------------------------

text_mentions = Table(
    "text_mentions",
    metadata,
    Column("post_id", BigId, ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    Column("brand", String(200), primary_key=True),
    Column("product", String(200), primary_key=True, default=""),  # '' = the brand itself
    Column("terms", JSON, nullable=False, default=list),
)

# Which text and catalogue each post's `text_mentions` were matched from: a post is matched
# again only when its `content_hash` or the catalogue fingerprint differs (revision 0004).
text_match_state = Table(
    "text_match_state",
    metadata,
    Column("post_id", BigId, ForeignKey("posts.id", ondelete="CASCADE"), primary_key=True),
    Column("content_hash", String(64), nullable=False),
    Column("catalogue", String(32), nullable=False),  # catalogue_fingerprint() when matched
)

# Detector class names -> catalogue brand (product '') or product, for the active model's
# classes; written by the aggregation job from the catalogue (revision 0004).
logo_class_map = Table(
    "logo_class_map",
    metadata,
    Column("class_name", String(200), primary_key=True),
    Column("brand", String(200), primary_key=True),
    Column("product", String(200), primary_key=True, default=""),  # '' = the brand itself
)

mention_daily = Table(
    "mention_daily",
    metadata,
    Column("day", Date, primary_key=True),
    Column("brand", String(200), primary_key=True),
    Column("product", String(200), primary_key=True),  # '*' = all products of the brand
    Column("platform", String(32), primary_key=True),  # '*' = all platforms
    Column("source", String(8), primary_key=True),  # text | image | both | any
    Column("posts", Integer, nullable=False),
    Column("images", Integer, nullable=False),
    Column("unique_authors", Integer, nullable=False),
    Column("reposts", Integer, nullable=False),
    Column("expected_mentions", Float, nullable=True),  # image counts corrected by precision/recall
    Column("rolling_7", Float, nullable=True),
    Column("rolling_28", Float, nullable=True),
    Column("wow_change", Float, nullable=True),
    Column("zscore", Float, nullable=True),
    Column("baseline", Float, nullable=True),  # the trailing 28-day mean the z-score compares to
    Column("spike", Boolean, nullable=False, default=False),
    Column("share_of_voice", Float, nullable=True),
    Column("model_version", String(64), nullable=True),
    Column("computed_at", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_mention_daily_brand_day", "brand", "day"),
    # The BI view v_spikes reads only the few spike rows (see pipeline/aggregate/views.py).
    Index("ix_mention_daily_spikes", "day", postgresql_where=text("spike"), sqlite_where=text("spike")),
)

# Forecasts of daily mentions ("the demand signal"), one row per key, issue day and day ahead;
# written by the aggregation (`pipeline.aggregate.forecast`), read through `v_forecast` (0007).
demand_signal = Table(
    "demand_signal",
    metadata,
    Column("brand", String(200), primary_key=True),
    Column("product", String(200), primary_key=True),  # '*' = all products
    Column("platform", String(32), primary_key=True),  # '*' = all platforms
    Column("issued_on", Date, primary_key=True),  # last day of the history the forecast used
    Column("day", Date, primary_key=True),  # the day forecast
    Column("horizon_days", Integer, nullable=False),  # day - issued_on
    Column("expected", Float, nullable=False),  # expected posts mentioning the brand (any source)
    Column("lower_95", Float, nullable=False),
    Column("upper_95", Float, nullable=False),
    Column("method", String(64), nullable=False),
    Column("history_days", Integer, nullable=False),
    Column("backtest_mae", Float, nullable=True),
    Column("baseline_mae", Float, nullable=True),  # seasonal naive, same backtest points
    Column("mase", Float, nullable=True),
    Column("beats_baseline", Boolean, nullable=True),
    Column("input_hash", String(64), nullable=False),  # of the history: unchanged input -> no rewrite
    Column("computed_at", UTCDateTime, nullable=False, default=utcnow),
)

dirty_days = Table(
    "dirty_days",
    metadata,
    Column("day", Date, primary_key=True),
    Column("reason", String(64), nullable=False),
    Column("marked_at", UTCDateTime, nullable=False, default=utcnow),
)

# --- operations ------------------------------------------------------------------------------

runs = Table(
    "runs",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),  # ingest | detect | aggregate | train | demo
    Column("source", String(128), nullable=True),
    Column("window_start", UTCDateTime, nullable=True),
    Column("window_end", UTCDateTime, nullable=True),
    Column("status", String(16), nullable=False),  # running | succeeded | failed
    Column("started_at", UTCDateTime, nullable=False, default=utcnow),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("counts", JSON, nullable=False, default=dict),
    Column("error", Text, nullable=True),
    Column("owner", String(128), nullable=True),  # host:pid
    Index("ix_runs_kind_source_window", "kind", "source", "window_start"),
)

locks = Table(
    "locks",
    metadata,
    Column("name", String(256), primary_key=True),
    Column("owner", String(128), nullable=False),
    Column("acquired_at", UTCDateTime, nullable=False, default=utcnow),
    Column("expires_at", UTCDateTime, nullable=False),
)

# --- alerts ----------------------------------------------------------------------------------

# One row per (rule, day, key, destination): the claim that makes every alert go out once.
# Life of a row: sending (claimed, `claim` = the claimant's token) -> sent | failed | skipped;
# failed rows are claimed again by later runs while attempts < max; a 'sending' row whose
# claim is older than the lease was left by a crash and is claimed again (revision 0006).
alert_ledger = Table(
    "alert_ledger",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("rule", String(64), nullable=False),
    Column("day", Date, nullable=False),
    Column("key", String(512), nullable=False),  # brand|product|platform|source
    Column("destination", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # sending | sent | failed | skipped
    Column("attempts", Integer, nullable=False, default=0),  # delivery rounds tried
    Column("late", Boolean, nullable=False, default=False),
    Column("payload", JSON, nullable=False, default=dict),  # the alert's figures (no secrets)
    Column("last_error", Text, nullable=True),  # scrubbed
    Column("claim", String(32), nullable=True),  # token of the run that holds the row
    Column("claimed_at", UTCDateTime, nullable=True),
    Column("sent_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("updated_at", UTCDateTime, nullable=False, default=utcnow),
    UniqueConstraint("rule", "day", "key", "destination"),
    CheckConstraint("status in ('sending','sent','failed','skipped')", name="status"),
    Index("ix_alert_ledger_status", "status"),
    Index("ix_alert_ledger_created_at", "created_at"),
)
