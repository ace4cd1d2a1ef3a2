"""The demo's sales series follows Globex mentions 7 days later, deterministically, and leaves
the feed itself untouched."""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from pipeline.synthetic import generate_dataset
from pipeline.synthetic.sales import (
    BASE_UNITS,
    NOISE_SD,
    PER_MENTION,
    mentions_per_day,
    sales_series,
)


def test_sales_follow_globex_mentions_with_the_known_lead():
    ds = generate_dataset(seed=7, days=30)
    digest = hashlib.sha256(json.dumps(ds.posts, sort_keys=True).encode()).hexdigest()
    sales = sales_series(ds)
    assert sales == sales_series(generate_dataset(seed=7, days=30))  # deterministic
    ment = mentions_per_day(ds, "Globex")
    assert len(sales) == 30 and min(sales) == ds.start + dt.timedelta(days=7)
    resid = [sales[d + dt.timedelta(days=7)] - BASE_UNITS - PER_MENTION * n for d, n in ment.items()]
    assert max(abs(r) for r in resid) < 4 * NOISE_SD + 1
    spike = max(ment, key=ment.get)  # Globex's spike day shows in sales a week later
    assert max(sales, key=sales.get) == spike + dt.timedelta(days=7)
    assert hashlib.sha256(json.dumps(ds.posts, sort_keys=True).encode()).hexdigest() == digest
