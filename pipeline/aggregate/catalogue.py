"""Mirror the configured catalogue (`settings.brands`) into the `brands` and `products` tables.

The aggregate SQL joins detections and the key grid on these tables, so they must say what the
YAML says. Rows change only when the configuration does (`updated_at` stays put otherwise);
brands and products removed from the YAML are removed from the tables (their old
`mention_daily` rows stay until their days are recomputed).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from pipeline.schema import brands as brands_t
from pipeline.schema import products as products_t
from pipeline.schema import utcnow
from pipeline.settings import Brand

RESERVED_PRODUCTS = ("", "*")  # '' = the brand itself in text_mentions, '*' = all in mention_daily


def brand_config(brand: Brand) -> dict[str, Any]:
    return {
        "keywords": list(brand.keywords),
        "hashtags": list(brand.hashtags),
        "aliases": list(brand.aliases),
        "accounts": list(brand.accounts),
        "exclude": list(brand.exclude),
    }


def catalogue_fingerprint(brands: Sequence[Brand]) -> str:
    """A stable hash of everything that decides text mentions (changes => restate history)."""
    doc = [
        {**brand_config(b), "name": b.name,
         "products": [{"name": p.name, "keywords": list(p.keywords), "hashtags": list(p.hashtags)} for p in b.products]}
        for b in brands
    ]
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def sync_catalogue(conn: Connection, brands: Sequence[Brand]) -> dict[str, int]:
    """Upsert brands/products from the settings and drop the ones no longer configured."""
    counts = {"brands_added": 0, "brands_updated": 0, "brands_removed": 0, "products_added": 0,
              "products_updated": 0, "products_removed": 0}
    existing = {r.name: r for r in conn.execute(select(brands_t.c.id, brands_t.c.name, brands_t.c.config))}
    wanted = {b.name: b for b in brands}
    for name, row in existing.items():
        if name not in wanted:
            conn.execute(delete(products_t).where(products_t.c.brand_id == row.id))
            conn.execute(delete(brands_t).where(brands_t.c.id == row.id))
            counts["brands_removed"] += 1
    for b in brands:
        cfg = brand_config(b)
        row = existing.get(b.name)
        if row is None:
            brand_id = conn.execute(
                insert(brands_t).values(name=b.name, config=cfg, updated_at=utcnow())
            ).inserted_primary_key[0]
            counts["brands_added"] += 1
        else:
            brand_id = row.id
            if row.config != cfg:
                conn.execute(update(brands_t).where(brands_t.c.id == brand_id).values(config=cfg, updated_at=utcnow()))
                counts["brands_updated"] += 1
        have = {r.name: r for r in conn.execute(
            select(products_t.c.id, products_t.c.name, products_t.c.config).where(products_t.c.brand_id == brand_id))}
        want = {p.name: {"keywords": list(p.keywords), "hashtags": list(p.hashtags)}
                for p in b.products if p.name not in RESERVED_PRODUCTS}
        for pname, prow in have.items():
            if pname not in want:
                conn.execute(delete(products_t).where(products_t.c.id == prow.id))
                counts["products_removed"] += 1
        for pname, pcfg in want.items():
            prow = have.get(pname)
            if prow is None:
                conn.execute(insert(products_t).values(brand_id=brand_id, name=pname, config=pcfg))
                counts["products_added"] += 1
            elif prow.config != pcfg:
                conn.execute(update(products_t).where(products_t.c.id == prow.id).values(config=pcfg))
                counts["products_updated"] += 1
    return counts


def catalogue_changed(counts: dict[str, int]) -> bool:
    return any(counts.values())
