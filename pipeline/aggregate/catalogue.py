"""Mirror the configured catalogue (`settings.brands`) into the `brands` and `products` tables,
and map the active detector model's class names onto it (`logo_class_map`).

The aggregate SQL joins detections and the key grid on these tables, so they must say what the
YAML says. Rows change only when the configuration does (`updated_at` stays put otherwise);
brands and products removed from the YAML are removed from the tables (their old
`mention_daily` rows stay until their days are recomputed).

Model classes are named by whoever labelled the training data (`Cocacola`, `coca_cola`), so
they are matched to brands and products by a normalised key (case, accents, spaces and
punctuation ignored), or by an explicit `logo_classes: [...]` list on a brand or product in
the YAML, which wins for the classes it names. SQL cannot normalise Unicode portably, so the
mapping is computed here and written to a small table the aggregate SQL joins.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from pipeline.aggregate.textmatch import normalize
from pipeline.errors import BrandmonError
from pipeline.schema import brands as brands_t
from pipeline.schema import logo_class_map, utcnow
from pipeline.schema import products as products_t
from pipeline.settings import Brand, Product, Settings

log = logging.getLogger(__name__)

RESERVED_PRODUCTS = ("", "*")  # '' = the brand itself in text_mentions, '*' = all in mention_daily
# Bump when textmatch's rules change: stored matches then no longer count as current.
MATCH_RULES_VERSION = 1
# Detector classes that stand for "no brand" (pipeline.detector.NO_LOGO and its spellings).
NEGATIVE_CLASS_KEYS = frozenset({"nologo", "none", "background"})

Target = tuple[str, str]  # (brand, product); product '' = the brand itself


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
    # sorted: the same catalogue read from the YAML or from the database (see
    # `stored_catalogue`) has one fingerprint whatever order it is listed in
    doc = [
        {**brand_config(b), "name": b.name,
         "products": sorted(({"name": p.name, "keywords": list(p.keywords), "hashtags": list(p.hashtags)}
                             for p in b.products), key=lambda p: p["name"])}
        for b in sorted(brands, key=lambda b: b.name)
    ]
    doc.append({"match_rules": MATCH_RULES_VERSION})
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


class CatalogueError(BrandmonError):
    """A catalogue that would delete the brands the database holds because it is empty."""


def stored_catalogue(conn: Connection) -> tuple[Brand, ...]:
    """The catalogue the database holds (last synced from a YAML), as `Brand`s.

    `logo_classes` are rebuilt from `logo_class_map`, so the active model's classes map to the
    same brands and products as when the YAML was read."""
    def strs(cfg: Any, key: str) -> tuple[str, ...]:
        value = cfg.get(key) if isinstance(cfg, dict) else None
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    mapped: dict[tuple[str, str], list[str]] = {}
    for c, b, p in conn.execute(select(logo_class_map.c.class_name, logo_class_map.c.brand, logo_class_map.c.product)
                                .order_by(logo_class_map.c.class_name)):
        mapped.setdefault((b, p), []).append(c)
    rows = list(conn.execute(select(brands_t.c.id, brands_t.c.name, brands_t.c.config).order_by(brands_t.c.id)))
    names = {r.id: r.name for r in rows}
    prods: dict[int, list[Product]] = {}
    for r in conn.execute(select(products_t.c.brand_id, products_t.c.name, products_t.c.config).order_by(products_t.c.id)):
        prods.setdefault(r.brand_id, []).append(Product(
            name=r.name, keywords=strs(r.config, "keywords"), hashtags=strs(r.config, "hashtags"),
            logo_classes=tuple(mapped.get((names.get(r.brand_id, ""), r.name), ()))))
    return tuple(
        Brand(
            name=r.name, keywords=strs(r.config, "keywords"), hashtags=strs(r.config, "hashtags"),
            aliases=strs(r.config, "aliases"), accounts=strs(r.config, "accounts"), exclude=strs(r.config, "exclude"),
            products=tuple(prods.get(r.id, ())), logo_classes=tuple(mapped.get((r.name, ""), ())),
        )
        for r in rows
    )


def catalogue_to_use(conn: Connection, settings: Settings, allow_empty: bool = False) -> tuple[Brand, ...]:
    """The brands an aggregation mirrors and counts: never an absent or empty configuration
    that would delete the brands, mentions and daily counts the database holds.

    - no BRANDMON_CONFIG at all (a forgotten variable, a worker without the file): the catalogue
      the database holds is kept and used, and an INFO line says so;
    - a config listing no brands while the database holds some: refused (CatalogueError)
      unless `allow_empty` (`--allow-empty-catalogue`) says the removal is meant;
    - a config sharing no brand with the database (another deployment's file): refused the
      same way;
    - otherwise the configured brands (removing some brands on purpose still works).
    """
    configured = tuple(settings.brands)
    stored = stored_catalogue(conn)
    if not stored:
        return configured
    names = ", ".join(b.name for b in stored[:5]) + (f" and {len(stored) - 5} more" if len(stored) > 5 else "")
    if configured:
        if allow_empty or {b.name.casefold() for b in configured} & {b.name.casefold() for b in stored}:
            return configured
        # not one brand in common: another deployment's file, not an edit of this one
        raise CatalogueError(
            f"{settings.config_path} lists none of the {len(stored)} brand(s) the database holds ({names}); "
            "aggregating would delete their mentions and daily counts. Point BRANDMON_CONFIG at the right file, "
            "or pass --allow-empty-catalogue to replace them on purpose"
        )
    if settings.config_path is None:
        log.info("BRANDMON_CONFIG is not set: aggregating with the catalogue the database holds (%d brand(s): %s); "
                 "set BRANDMON_CONFIG to the YAML file to change it", len(stored), names)
        return stored
    if allow_empty:
        log.warning("%s lists no brands: removing the %d brand(s) the database holds (%s), as "
                    "--allow-empty-catalogue asks", settings.config_path, len(stored), names)
        return configured
    raise CatalogueError(
        f"{settings.config_path} lists no brands, but the database holds {len(stored)} ({names}); aggregating "
        "would delete their mentions and daily counts. Add them under `brands:` (or point BRANDMON_CONFIG at the "
        "right file), or pass --allow-empty-catalogue to remove them on purpose"
    )


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


# --- detector classes -> brands and products ---------------------------------------------------


def class_key(name: str) -> str:
    """Case-, accent- and punctuation-free key: 'Coca-Cola', 'coca_cola', 'COCACOLA' -> 'cocacola'."""
    return "".join(ch for ch in normalize(str(name)) if ch.isalnum())


def map_classes(classes: Iterable[str], brands: Sequence[Brand]) -> tuple[list[dict[str, str]], list[str]]:
    """(logo_class_map rows, classes that match nothing) for a model's class names.

    A class listed in some brand's or product's `logo_classes` maps to exactly those
    brands/products; any other
    class maps to every brand and product whose name has the same `class_key`. A product
    class also counts as its brand in the SQL (as a product named in text does).
    """
    by_name: dict[str, set[Target]] = {}
    by_list: dict[str, set[Target]] = {}
    for b in brands:
        by_name.setdefault(class_key(b.name), set()).add((b.name, ""))
        for n in b.logo_classes:
            by_list.setdefault(class_key(n), set()).add((b.name, ""))
        for p in b.products:
            if p.name not in RESERVED_PRODUCTS:
                by_name.setdefault(class_key(p.name), set()).add((b.name, p.name))
            for n in p.logo_classes:
                by_list.setdefault(class_key(n), set()).add((b.name, p.name))
    rows: list[dict[str, str]] = []
    unmatched: list[str] = []
    for cls in dict.fromkeys(str(c) for c in classes):
        key = class_key(cls)
        targets = by_list.get(key) or by_name.get(key) or set()
        if not key or not targets:
            if key not in NEGATIVE_CLASS_KEYS:
                unmatched.append(cls)
            continue
        rows += [{"class_name": cls, "brand": b, "product": p} for b, p in sorted(targets)]
    return rows, unmatched


def sync_logo_classes(conn: Connection, classes: Iterable[str], brands: Sequence[Brand]) -> tuple[int, list[str]]:
    """Make `logo_class_map` map these classes; returns (rows changed, unmatched classes)."""
    rows, unmatched = map_classes(classes, brands)
    want = {(r["class_name"], r["brand"], r["product"]) for r in rows}
    have = set(conn.execute(select(logo_class_map.c.class_name, logo_class_map.c.brand, logo_class_map.c.product)))
    gone = have - want
    for c, b, p in sorted(gone):
        conn.execute(delete(logo_class_map).where(
            logo_class_map.c.class_name == c, logo_class_map.c.brand == b, logo_class_map.c.product == p))
    new = sorted(want - have)
    if new:
        conn.execute(insert(logo_class_map), [{"class_name": c, "brand": b, "product": p} for c, b, p in new])
    return len(gone) + len(new), unmatched


def unmatched_warning(version: str | None, unmatched: Sequence[str]) -> str | None:
    """The one-line warning for active-model classes that count as no brand at all."""
    if not unmatched:
        return None
    shown = ", ".join(repr(c) for c in unmatched[:10]) + (f" and {len(unmatched) - 10} more" if len(unmatched) > 10 else "")
    return (f"active model {version}: class(es) {shown} match no catalogue brand or product, so their "
            "detections count as no mention; rename the brand/product or list the class under its "
            "`logo_classes:` in the YAML")
