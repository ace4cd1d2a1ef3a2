"""Shared helpers for the detector tests: tiny generated image sets, stored images, models.

The generated marks are deliberately easy (a red disc, a blue square on textured
backgrounds) so that a head trained on a frozen, randomly initialised Inception v3 at 75 px
learns them in seconds: the tests check the machinery, not the network's capacity.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from sqlalchemy import insert

from pipeline.schema import images, post_images, posts

# Small, fast settings for every test training run.
FAST = {
    "input_size": 75,
    "mode": "head",
    "head_epochs": 25,
    "batch_size": 16,
    "synthetic_negatives": 0,
    "matcher": "off",
    "crop_net": "off",  # its own tests turn it on (tests/detector/test_detector_cropnet.py)
}
MARKS = {"Reddisc": ((210, 30, 30), "disc"), "Bluesquare": ((30, 60, 210), "square")}


def scene(kind: str | None, seed: int, size: int = 96) -> Image.Image:
    """A textured background, with the mark of `kind` (a MARKS key) or none."""
    r = random.Random(seed)
    nr = np.random.default_rng(seed)
    base = np.array([r.randint(90, 200) for _ in range(3)], np.float32)
    arr = np.clip(base + nr.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    d = ImageDraw.Draw(img)
    for _ in range(r.randint(1, 4)):  # grey clutter lines
        g = r.randint(40, 220)
        d.line([(r.randint(0, size), r.randint(0, size)), (r.randint(0, size), r.randint(0, size))], fill=(g, g, g), width=3)
    if kind is not None:
        color, shape = MARKS[kind]
        side = int(size * r.uniform(0.35, 0.6))
        x, y = r.randint(0, size - side), r.randint(0, size - side)
        (d.ellipse if shape == "disc" else d.rectangle)([x, y, x + side, y + side], fill=color)
    return img


def jpeg_bytes(img: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_folders(root: Path, counts: dict[str, int], seed: int = 0, size: int = 96) -> Path:
    """`root/<Class>/<n>.jpg`; class `no_logo` gets scenes without a mark."""
    for cls, n in counts.items():
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        kind = None if cls.casefold() == "no_logo" else next(k for k in MARKS if k.casefold() == cls.casefold())
        for i in range(n):
            s = int(hashlib.sha256(f"{seed}:{cls}:{i}".encode()).hexdigest()[:8], 16)
            (d / f"{i:04d}.jpg").write_bytes(jpeg_bytes(scene(kind, s, size)))
    return root


def make_boxes(root: Path, n: int, seed: int = 0, size: int = 160, style: str = "json") -> Path:
    """Photos with one mark each and its box: per-image JSON or a FlickrLogos-27 text file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        r = random.Random(seed * 1000 + i)
        kind = list(MARKS)[i % len(MARKS)]
        img = scene(None, seed * 1000 + i, size)
        side = int(size * r.uniform(0.25, 0.4))
        x, y = r.randint(0, size - side), r.randint(0, size - side)
        color, shape = MARKS[kind]
        d = ImageDraw.Draw(img)
        (d.ellipse if shape == "disc" else d.rectangle)([x, y, x + side, y + side], fill=color)
        name = f"img{i:04d}.jpg"
        (root / name).write_bytes(jpeg_bytes(img))
        if style == "json":
            doc = [{"xmin": x, "ymin": y, "xmax": x + side, "ymax": y + side, "classtxt": kind, "class": i % 2}]
            (root / f"img{i:04d}.json").write_text(json.dumps(doc))
        else:
            lines += [f"{name} {kind} {k} {x} {y} {x + side} {y + side}" for k in (1, 2)]  # duplicates, as FL27
    if lines:
        (root / "annotations.txt").write_text("\n".join(lines) + "\n")
    return root


def store_images(ctx: Any, blobs: list[bytes], posted_at: dt.datetime | None = None) -> list[str]:
    """Put image bytes in the lake + `images`, each attached to its own post; returns shas."""
    posted_at = posted_at or dt.datetime(2026, 10, 3, 12, tzinfo=dt.UTC)
    shas = []
    with ctx.engine.begin() as conn:
        for i, data in enumerate(blobs):
            sha = hashlib.sha256(data).hexdigest()
            key = f"images/sha256/{sha[:2]}/{sha[2:4]}/{sha}"
            ctx.store.put(key, data, content_type="image/jpeg")
            conn.execute(insert(images).values(sha256=sha, storage_key=key, mime="image/jpeg", size_bytes=len(data)))
            pid = conn.execute(
                insert(posts).values(
                    platform="test", external_id=f"p{sha[:12]}", source="test", author_hash="a" * 64, text="",
                    posted_at=posted_at + dt.timedelta(hours=i % 3), content_hash="c" * 64,
                )
            ).inserted_primary_key[0]
            conn.execute(insert(post_images).values(post_id=pid, position=0, url=f"https://x/{i}", sha256=sha, status="stored"))
            shas.append(sha)
    return shas


def argmax_recall(ctx: Any, folder: Path, cls: str, version: str | None = None) -> float:
    """Share of `folder/<cls>/` images whose highest class probability (any class) is `cls`."""
    from pipeline.detector.data import decode_rgb, load_folders
    from pipeline.detector.model import resize_batch
    from pipeline.detector.registry import load_model

    model = load_model(ctx, version)
    srcs = [s for s in load_folders(folder) if s.label == cls]
    x = resize_batch([decode_rgb(s.read()) for s in srcs], model.spec.input_size)
    probs = model.predict_arrays(x)
    return float(np.mean(probs.argmax(axis=1) == model.spec.classes.index(cls)))
