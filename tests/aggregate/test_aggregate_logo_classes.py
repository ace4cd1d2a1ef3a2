"""Detector classes -> catalogue brands and products: normalised names, explicit
`logo_classes`, product image mentions, and the warning for classes that match nothing."""

from __future__ import annotations

import datetime as dt

import pytest
from agg_helpers import FakePost, add_detections, add_model, add_posts, ts
from sqlalchemy import select

from pipeline.aggregate.catalogue import class_key, map_classes
from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.errors import ConfigError
from pipeline.schema import logo_class_map, mention_daily
from pipeline.settings import Brand, Product

DAY = dt.date(2026, 10, 5)
CONFIG = {
    "brands": [
        {"name": "Coca-Cola", "keywords": ["coca-cola", "coke"],
         "products": [{"name": "Coke Zero", "keywords": ["coke zero"], "logo_classes": ["zero_can", "coke-zero-v2"]}]},
        {"name": "Acmé", "keywords": ["acme"], "logo_classes": ["acme_logo_v2"]},
        {"name": "Initech", "keywords": ["initech"]},
    ],
}
CLASSES = ("Cocacola", "zero_can", "ACME", "acme_logo_v2", "Mystery", "no_logo", "Initech Inc")


def test_class_key_ignores_case_accents_spaces_and_punctuation():
    assert class_key("Coca-Cola") == class_key("cocacola") == class_key("COCA_COLA") == class_key("Cóca Cola") == "cocacola"
    assert class_key("Acmé!") == "acme"
    assert class_key("グロベックス") == class_key("ｸﾞﾛﾍﾞｯｸｽ") != ""  # any script; width-insensitive
    assert class_key("---") == ""


def test_map_classes_by_name_and_by_explicit_list():
    brands = (
        Brand("Coca-Cola", products=(Product("Coke Zero"),)),
        # an explicit list wins for its classes
        Brand("Acme", products=(Product("Acme One"),), logo_classes=("acme_logo_v2", "Coke Zero")),
    )
    rows, unmatched = map_classes(
        ["Cocacola", "COKE_ZERO", "coke zero", "acme", "Acme-One", "acme_logo_v2", "no_logo", "NO-LOGO", "?", "Mystery"],
        brands)
    got = {(r["class_name"], r["brand"], r["product"]) for r in rows}
    assert got == {
        ("Cocacola", "Coca-Cola", ""),
        ("COKE_ZERO", "Acme", ""), ("coke zero", "Acme", ""),  # listed under Acme: not the product
        ("acme", "Acme", ""), ("Acme-One", "Acme", "Acme One"), ("acme_logo_v2", "Acme", ""),
    }
    assert unmatched == ["?", "Mystery"]  # the negative class is not a warning


def test_malformed_logo_classes_is_one_clear_error():
    from pipeline.settings import parse_config_document

    with pytest.raises(ConfigError, match=r"brands\[0\]\.logo_classes must be a list of strings"):
        parse_config_document({"brands": [{"name": "Acme", "logo_classes": {"a": 1}}]})
    with pytest.raises(ConfigError, match=r"brands\[0\]\.products\[0\]\.logo_classes must be a list"):
        parse_config_document({"brands": [{"name": "Acme", "products": [{"name": "One", "logo_classes": [["x"]]}]}]})


def rows_of(ctx) -> dict[tuple, dict]:
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(mention_daily).where(mention_daily.c.day == DAY)).mappings().all()
    return {(r["brand"], r["product"], r["platform"], r["source"]): dict(r) for r in rows}


def test_image_mentions_use_the_class_map_on_both_backends(make_ctx, backend, monkeypatch):
    ctx = make_ctx(CONFIG, backend)
    with ctx.engine.begin() as conn:
        add_model(conn, "m1", classes=CLASSES)
        add_posts(conn, [
            FakePost(1, "p1", ts(DAY, 1), "look", images=["red-can"]),  # Cocacola -> Coca-Cola
            FakePost(2, "p2", ts(DAY, 2), "", images=["black-can"]),  # zero_can -> Coke Zero (and its brand)
            FakePost(3, "p3", ts(DAY, 3), "coke zero tonight", images=["red-can-2"]),  # product named + brand image
            FakePost(4, "p4", ts(DAY, 4), "", images=["anvil"]),  # acme_logo_v2 -> Acmé (explicit)
            FakePost(5, "p5", ts(DAY, 5), "", images=["anvil-2"]),  # ACME -> Acmé (by name)
            FakePost(6, "p6", ts(DAY, 6), "", images=["ufo"]),  # Mystery -> nothing
            FakePost(7, "p7", ts(DAY, 7), "", images=["blank"]),  # no_logo -> nothing
        ])
        add_detections(conn, [("red-can", "Cocacola", 0.9), ("black-can", "zero_can", 0.8),
                              ("red-can-2", "Cocacola", 0.95), ("anvil", "acme_logo_v2", 0.7),
                              ("anvil-2", "ACME", 0.9), ("ufo", "Mystery", 0.99), ("blank", "no_logo", 0.99),
                              ("anvil-2", "zero_can", 0.2)])  # below the threshold
    res = aggregate_dirty(ctx)
    assert res["unmatched_classes"] == 2  # Mystery, and 'Initech Inc' (not 'Initech')
    rows = rows_of(ctx)

    def posts(brand, product="*", source="any"):
        return rows[(brand, product, "*", source)]["posts"]

    assert (posts("Coca-Cola", source="image"), posts("Coca-Cola", source="both"), posts("Coca-Cola")) == (2, 1, 3)
    assert (posts("Coca-Cola", "Coke Zero", "image"), posts("Coca-Cola", "Coke Zero", "both"),
            posts("Coca-Cola", "Coke Zero", "text")) == (1, 1, 0)
    assert posts("Acmé", source="image") == 2 and posts("Initech") == 0
    assert rows[("Coca-Cola", "*", "*", "image")]["images"] == 2
    with ctx.engine.connect() as conn:
        mapped = set(conn.execute(select(logo_class_map)))
    assert mapped == {("Cocacola", "Coca-Cola", ""), ("zero_can", "Coca-Cola", "Coke Zero"), ("ACME", "Acmé", ""),
                      ("acme_logo_v2", "Acmé", "")}

    # `brandmon status` names the class that matches nothing.
    from pipeline.status import collect_status, format_status

    s = ctx.settings
    for key, value in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                       "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_HOME": str(s.home),
                       "BRANDMON_AUTHOR_SALT": s.author_salt.get(),
                       **({"BRANDMON_S3_ENDPOINT_URL": s.s3_endpoint_url} if s.s3_endpoint_url else {})}.items():
        monkeypatch.setenv(key, value)
    report = collect_status()
    assert report["ok"] and len(report["warnings"]) == 1
    assert "'Mystery'" in report["warnings"][0] and "'Initech Inc'" in report["warnings"][0]
    assert "no_logo" not in report["warnings"][0] and "logo_classes" in report["warnings"][0]
    assert "WARNING  : active model m1: class(es) 'Mystery', 'Initech Inc'" in format_status(report)
