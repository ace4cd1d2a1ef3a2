"""Options of the synthetic demo source (README's options table is generated from these)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from pipeline.sources.options import SourceOptions, option


@dataclass(frozen=True)
class SyntheticOptions(SourceOptions):
    seed: int = option(7, "the generator's seed")
    days: int = option(30, "days of posts", low=1)
    start: str = option("2026-10-01", "the first day", date=True)

    @property
    def first_day(self) -> dt.date:
        return dt.date.fromisoformat(self.start)
