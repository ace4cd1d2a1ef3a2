"""The demo's synthetic history loaded straight into the tables (no ingestion, no training):
the detections are the feed's ground truth (`agg_helpers.dataset_detections`), so the counts
are the demo's figures, in a few seconds."""

from __future__ import annotations

from agg_helpers import add_detections, add_model, add_posts, dataset_detections, dataset_posts

from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.synthetic import demo_config, generate_dataset

DEMO_CONFIG = {"brands": demo_config(None)["brands"]}


def demo_history_ctx(make_ctx, backend: str = "sqlite", seed: int = 7, days: int = 30):
    ctx = make_ctx(DEMO_CONFIG, backend)
    ds = generate_dataset(seed=seed, days=days)
    with ctx.engine.begin() as conn:
        add_model(conn, classes=[b["name"] for b in DEMO_CONFIG["brands"]])
        add_posts(conn, dataset_posts(ds))
        add_detections(conn, dataset_detections(ds)[0])
    aggregate_dirty(ctx)
    return ctx, ds
