"""The synthetic demo source: `pipeline.synthetic.generate_dataset` as a feed like the others.

Options: `options.py` (a `platform` option is ignored: records carry `platform: synthetic`). Records are in the archive shape and are
normalised by the same rules; images (`synthetic://...` URLs) come from the dataset's
`image_bytes`, never from the network. One window = one page in the raw lake.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.records import Post
from pipeline.settings import NetworkConfig, SourceConfig
from pipeline.sources.archive.parse import parse_row
from pipeline.sources.connector import Connector, Page
from pipeline.sources.parsing import Normalizer
from pipeline.sources.synthetic.options import SyntheticOptions

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

    options: SyntheticOptions

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(source, network, sleep=sleep)
        self.seed, self.days, self.start = self.options.seed, self.options.days, self.options.first_day

    @property
    def dataset(self) -> Any:
        return dataset_for(self.seed, self.days, self.start)

    def pages(self, start: dt.datetime, end: dt.datetime, resume: dict[str, Any] | None = None) -> Iterator[Page]:
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
        return parse_row(normalizer, record)

    def image_bytes(self, url: str) -> bytes | None:
        if not url.startswith("synthetic://"):
            return None
        return self.dataset.image_bytes(url)
