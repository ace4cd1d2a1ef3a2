"""The demo brand catalogue: three fictional brands in the YAML `brands:` contract shape.

Fictional names keep the demo and the tests free of real trademarks; the same dicts feed
`load_settings` (through `demo_config`) and the synthetic post generator, so the text the
generator writes and the keywords the matcher looks for can never drift apart.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

DEMO_BRANDS: list[dict[str, Any]] = [
    {
        "name": "Acme",
        "keywords": ["acme"],
        "hashtags": ["acme"],
        "aliases": ["acme corp"],
        "products": [
            {"name": "Acme One", "keywords": ["acme one"]},
            {"name": "Acme Go", "keywords": ["acme go"]},
        ],
    },
    {
        "name": "Globex",
        "keywords": ["globex"],
        "hashtags": ["globex"],
        "aliases": ["globex corporation"],
        "products": [{"name": "Globex Max", "keywords": ["globex max"]}],
    },
    {
        "name": "Initech",
        "keywords": ["initech"],
        "hashtags": ["initech"],
        "aliases": ["initech inc"],
        "products": [{"name": "Initech Pro", "keywords": ["initech pro"]}],
    },
]

DEMO_SOURCE: dict[str, Any] = {
    "name": "demo",
    "kind": "synthetic",
    "seed": 7,
    "days": 30,
    "start": "2026-10-01",
}


def brand_names() -> list[str]:
    return [b["name"] for b in DEMO_BRANDS]


def demo_config(dataset_dir: str | Path | None = None) -> dict[str, Any]:
    """A full config dict (YAML contract) for the demo; a fresh deep copy every call.

    `dataset_dir`, when given, is recorded as the synthetic source's `path` (where a
    consumer may keep rendered images); the generator itself needs no files.
    """
    source = dict(DEMO_SOURCE)
    if dataset_dir is not None:
        source["path"] = str(dataset_dir)
    return {"brands": copy.deepcopy(DEMO_BRANDS), "sources": [source]}
