"""The synthetic demo source: `pipeline.synthetic.generate_dataset` as a feed like the others.

Options: `seed` (default 7), `days` (default 30), `start` (first day, ISO date), `platform`
(ignored: records carry `platform: synthetic`). Records are in the archive shape and are
normalised by the same rules; images (`synthetic://...` URLs) come from the dataset's
`image_bytes`, never from the network. One window = one page in the raw lake.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

from pipeline.errors import ConfigError
from pipeline.ingest.connectors.base import Connector, Page
from pipeline.ingest.normalize import Normalizer
from pipeline.records import Post

_CACHE: dict[tuple[int, int, dt.date], Any] = {}
_LOCK = threading.Lock()


def dataset_for(seed: int, days: int, start: dt.date) -> Any:
    """The generated dataset, built once per process (a backfill asks for it every window)."""
    key = (seed, days, start)
    with _LOCK:
        if key not in _CACHE:
            from pipeline.synthetic import generate_dataset

            _CACHE.clear()
            _CACHE[key] = generate_dataset(seed=seed, days=days, start=start)
        return _CACHE[key]


class SyntheticConnector(Connector):
    kind = "synthetic"
    platform = "synthetic"

    def __init__(self, source, network, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(source, network, **kwargs)
        try:
            self.seed = int(source.get("seed", 7))
            self.days = int(source.get("days", 30))
            self.start = dt.date.fromisoformat(str(source.get("start", "2026-10-01")))
        except (TypeError, ValueError):
            raise ConfigError(f"source {source.name!r}: `seed`/`days` must be integers and `start` an ISO date") from None

    @property
    def dataset(self) -> Any:
        return dataset_for(self.seed, self.days, self.start)

    def pages(self, start: dt.datetime, end: dt.datetime, resume: dict[str, Any] | None = None):  # type: ignore[no-untyped-def]
        posts = self.dataset.posts_between(start, end)
        body = {"posts": posts}
        yield Page(
            request={"generator": "pipeline.synthetic", "seed": self.seed, "days": self.days, "start": self.start.isoformat()},
            body=body,
            state={"stream": 1, "stream_done": True},
            records=posts,
        )

    def records_of(self, body: Any) -> list[Any]:
        return body.get("posts", []) if isinstance(body, dict) else []

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        return normalizer.archive(record)

    def image_bytes(self, url: str) -> bytes | None:
        if not url.startswith("synthetic://"):
            return None
        return self.dataset.image_bytes(url)
