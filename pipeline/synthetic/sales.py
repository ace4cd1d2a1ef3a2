"""A synthetic sales series that follows one brand's mentions with a known lead.

For the demo and the tests of `brandmon demand`: units sold on day d are a base level plus
`PER_MENTION` units per post mentioning the brand on day d - `lead` (the ground truth of the
synthetic feed, text or image, reblogs included), plus Gaussian noise. The series covers the
days whose lead day is in the feed, so it runs `lead` days past the feed's end. Its own
random stream: the posts of the feed are untouched.
"""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from pipeline.synthetic.generate import SyntheticDataset

DEMO_SALES_BRAND = "Globex"
DEMO_LEAD_DAYS = 7
BASE_UNITS = 40.0
PER_MENTION = 1.5
NOISE_SD = 6.0


def mentions_per_day(ds: SyntheticDataset, brand: str) -> dict[dt.date, int]:
    truth = ds.daily_truth()
    return {ds.start + dt.timedelta(days=k): truth.get((brand, ds.start + dt.timedelta(days=k)), {}).get("posts", 0)
            for k in range(ds.days)}


def sales_series(ds: SyntheticDataset, brand: str = DEMO_SALES_BRAND, lead: int = DEMO_LEAD_DAYS,
                 seed: int | None = None) -> dict[dt.date, int]:
    """{day: units}, units following the brand's mentions `lead` days later."""
    rng = random.Random(f"brandmon-sales:{ds.seed if seed is None else seed}:{brand}:{lead}")
    out = {}
    for day, n in sorted(mentions_per_day(ds, brand).items()):
        out[day + dt.timedelta(days=lead)] = max(0, round(BASE_UNITS + PER_MENTION * n + rng.gauss(0.0, NOISE_SD)))
    return out


def write_sales_csv(path: str | Path, sales: dict[dt.date, int]) -> Path:
    """`date,units` lines; rewritten only when the content differs (idempotent demo runs)."""
    p = Path(path)
    text = "date,units\n" + "".join(f"{d.isoformat()},{u}\n" for d, u in sorted(sales.items()))
    if not p.exists() or p.read_text() != text:
        p.write_text(text)
    return p
