"""The contract between the brandmon DAGs: asset URIs, pool names and the detect batch-key format.

Each fact is written once here and shared by the DAG that produces an asset and the DAG
scheduled on it (as Airflow's `example_assets.py` defines each asset once), by
`brandmon model activate` (which emits the model event through Airflow's REST API) and by the
detector, which makes and parses the batch keys the detect DAG maps over.

Standard library only at import (and `pipeline.errors`, itself standard library only): the
DAG files import it at parse time, and the detector's command line needs no Airflow. The
`Asset` objects are built on first use of `assets()`, once per process, so every DAG file of
a DagBag gets the very same objects.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, NamedTuple

from pipeline.errors import BrandmonError

if TYPE_CHECKING:
    from airflow.sdk import Asset

# Asset URIs: producer -> consumer.
POSTS = "brandmon://posts"  # brandmon_ingest -> brandmon_detect
MODEL = "brandmon://model"  # brandmon_train, `brandmon model activate` -> brandmon_detect
DETECT_BACKLOG = "brandmon://detect-backlog"  # brandmon_detect -> brandmon_detect
DETECTIONS = "brandmon://detections"  # brandmon_detect -> brandmon_aggregate
AGGREGATE_BACKLOG = "brandmon://aggregate-backlog"  # brandmon_aggregate -> brandmon_aggregate

# Pools: TensorFlow work (detect batches, training); BRANDMON_TF_POOL may name another.
TF_POOL = "brandmon_tf"


class DagAssets(NamedTuple):
    """The Airflow `Asset` of each URI above (one object per URI and process)."""

    posts: Asset
    model: Asset
    detect_backlog: Asset
    detections: Asset
    aggregate_backlog: Asset


URIS: tuple[str, ...] = (POSTS, MODEL, DETECT_BACKLOG, DETECTIONS, AGGREGATE_BACKLOG)  # DagAssets order


@functools.cache
def assets() -> DagAssets:
    """The shared `Asset` objects (airflow.sdk is imported here, not when this module loads)."""
    from airflow.sdk import Asset

    return DagAssets(*(Asset(uri) for uri in URIS))


# Detect batch keys: `VERSION:FIRST_SHA:LAST_SHA`, one range of unscored images (an XCom value
# of ~140 bytes), made by the detector's `pending_batches`, mapped over by brandmon_detect.
BATCH_KEY_SEP = ":"


class BadBatchKey(BrandmonError):
    """A detect batch key that `make_batch_key` did not make."""


def make_batch_key(version: str, lo: str, hi: str) -> str:
    """`VERSION:FIRST_SHA:LAST_SHA`: one detect batch."""
    return BATCH_KEY_SEP.join((version, lo, hi))


def parse_batch_key(key: str) -> tuple[str, str, str]:
    """(version, first sha, last sha) of a key `make_batch_key` made; anything else is refused."""
    parts = str(key).split(BATCH_KEY_SEP)
    if len(parts) != 3 or not all(parts):
        raise BadBatchKey(f"bad detect batch key {key!r}; expected VERSION:FIRST_SHA:LAST_SHA from pending_batches")
    return parts[0], parts[1], parts[2]


def batch_label(key: str) -> str:
    """The mapped task's label in the UI: the batch's first and last sha, shortened."""
    _version, first, last = (str(key).split(BATCH_KEY_SEP) + ["", "", ""])[:3]
    return f"{first[:10]}..{last[:10]}"
