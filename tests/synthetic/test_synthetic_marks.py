"""Scenes: deterministic bytes, a mark that differs per brand, clutter without a mark."""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from pipeline.synthetic import MARKS, demo_config, mark_spec, render_scene, scene_jpeg
from pipeline.synthetic.marks import mark_image


def test_scene_jpeg_is_deterministic_and_seed_sensitive():
    a = scene_jpeg(42, "Acme")
    assert a == scene_jpeg(42, "Acme")
    assert a != scene_jpeg(43, "Acme")
    assert a != scene_jpeg(42, "Globex")
    img = Image.open(io.BytesIO(scene_jpeg(5, None, size=160, quality=80)))
    assert img.size == (160, 160) and img.format == "JPEG"


def test_render_scene_accepts_numpy_generator():
    a = render_scene(np.random.default_rng(1), "Initech", size=120)
    b = render_scene(np.random.default_rng(1), "Initech", size=120)
    assert a.size == (120, 120) and a.tobytes() == b.tobytes()
    assert render_scene(random.Random(1), None).size == (299, 299)


def test_marks_are_distinct_per_brand():
    specs = {b: MARKS[b] for b in ("Acme", "Globex", "Initech")}
    assert len({s.shape for s in specs.values()}) == 3
    assert len({s.fill for s in specs.values()}) == 3
    arrs = [np.asarray(mark_image(b), np.int16) for b in specs]
    assert all(np.abs(x - y).mean() > 20 for i, x in enumerate(arrs) for y in arrs[i + 1 :])
    other = mark_spec("Umbrella")
    assert other == mark_spec("Umbrella") and other.letters == "Um"


def test_mark_is_visible_in_scene():
    """With the same seed, a branded scene differs from the unbranded one in a sizeable area."""
    for seed in range(5):
        plain = np.asarray(render_scene(random.Random(seed), None), np.int16)
        marked = np.asarray(render_scene(random.Random(seed), "Globex"), np.int16)
        changed = (np.abs(plain - marked).sum(axis=2) > 60).mean()
        assert changed > 0.015, (seed, changed)


def test_demo_config_shape():
    cfg = demo_config(None)
    assert [b["name"] for b in cfg["brands"]] == ["Acme", "Globex", "Initech"]
    assert cfg["sources"] == [
        {"name": "demo", "kind": "synthetic", "seed": 7, "days": 30, "start": "2026-10-01"}
    ]
    cfg["brands"][0]["keywords"].append("mutated")
    assert "mutated" not in demo_config(None)["brands"][0]["keywords"]
    assert demo_config("/tmp/x")["sources"][0]["path"] == "/tmp/x"
