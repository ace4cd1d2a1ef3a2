"""Brand marks drawn into cluttered scenes: the images the demo's logo classifier learns and scores.

Each brand has a distinctive mark (shape + colours + letters). A scene puts one mark onto a
varied background at a random position, scale, rotation and colour, partly occluded, among
clutter and decoys that share the marks' colours but not their shapes, so a model must learn
the mark, not a colour. Everything comes from one seeded RNG: same seed, same bytes (for a
given Pillow version).
"""

from __future__ import annotations

import hashlib
import io
import math
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

RGB = tuple[int, int, int]
BASE = 192  # side of the pre-rendered mark, before scaling into a scene


@dataclass(frozen=True)
class MarkSpec:
    shape: str  # circle | diamond | hexagon | triangle | square | shield
    fill: RGB
    accent: RGB
    ink: RGB  # letter colour
    letters: str


MARKS: dict[str, MarkSpec] = {
    "Acme": MarkSpec("circle", (214, 40, 40), (255, 209, 102), (255, 255, 255), "A"),
    "Globex": MarkSpec("diamond", (29, 53, 120), (247, 127, 0), (255, 255, 255), "G"),
    "Initech": MarkSpec("hexagon", (30, 150, 110), (20, 20, 20), (255, 255, 255), "In"),
}
SHAPES = ("circle", "diamond", "hexagon", "triangle", "square", "shield")
WORDS = (
    "SALE",
    "open",
    "hello",
    "cafe",
    "2026",
    "menu",
    "new",
    "LIVE",
    "park",
    "bus 42",
    "ok",
    "team",
    "shop",
    "mon-fri",
    "exit",
    "hotel",
    "free",
    "wifi",
    "today",
    "lol",
)


def mark_spec(brand: str) -> MarkSpec:
    """The demo marks, or a stable made-up mark for any other brand name."""
    if brand in MARKS:
        return MARKS[brand]
    h = hashlib.sha256(brand.encode()).digest()
    fill = (h[0] % 200 + 20, h[1] % 200 + 20, h[2] % 200 + 20)
    accent = (255 - fill[0], 255 - fill[1], 255 - fill[2])
    letters = "".join(c for c in brand if c.isalnum())[:2].title() or "X"
    return MarkSpec(SHAPES[h[3] % len(SHAPES)], fill, accent, (255, 255, 255), letters)


def _polygon(
    shape: str, cx: float, cy: float, r: float, turn: float = 0.0
) -> list[tuple[float, float]]:
    sides, start = {
        "diamond": (4, -90),
        "hexagon": (6, 0),
        "triangle": (3, -90),
        "square": (4, -45),
    }[shape]
    return [
        (
            cx + r * math.cos(math.radians(start + turn + i * 360 / sides)),
            cy + r * math.sin(math.radians(start + turn + i * 360 / sides)),
        )
        for i in range(sides)
    ]


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[float, float, float, float],
    fill: Any,
    outline: Any = None,
    width: int = 0,
) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    if shape == "circle":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "shield":
        pts = [(x0, y0), (x1, y0), (x1, cy), (cx, y1), (x0, cy)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill, outline=outline, width=width)


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's bundled font: the same glyphs on every machine, no system fonts needed."""
    return ImageFont.load_default(size=max(6, int(size)))  # type: ignore[return-value]


@lru_cache(maxsize=32)
def mark_image(brand: str) -> Image.Image:
    """The brand's mark as an RGBA square, transparent around the shape (cached)."""
    spec = mark_spec(brand)
    s = BASE * 2  # supersample, then downscale for smooth edges
    img = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    m = s * 0.03
    _draw_shape(d, spec.shape, (m, m, s - m, s - m), fill=spec.accent + (255,))
    inner = s * 0.11
    _draw_shape(d, spec.shape, (inner, inner, s - inner, s - inner), fill=spec.fill + (255,))
    if spec.shape == "hexagon":  # a bar under the letters makes Initech's mark less plain
        d.rectangle((s * 0.3, s * 0.64, s * 0.7, s * 0.7), fill=spec.accent + (255,))
    f = font(int(s * (0.5 if len(spec.letters) == 1 else 0.36)))
    cy = s * (0.47 if spec.shape != "triangle" else 0.58)
    d.text(
        (s / 2, cy),
        spec.letters,
        font=f,
        fill=spec.ink + (255,),
        anchor="mm",
        stroke_width=max(2, s // 90),
        stroke_fill=spec.ink + (255,),
    )
    return img.resize((BASE, BASE), Image.Resampling.LANCZOS)


def _as_random(rng: random.Random | np.random.Generator) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    return random.Random(int(rng.integers(0, 2**63 - 1)))


def _colour(r: random.Random) -> RGB:
    return (r.randrange(256), r.randrange(256), r.randrange(256))


def _background(r: random.Random, nr: np.random.Generator, size: int) -> Image.Image:
    kind = r.choice(("gradient", "blobs", "photo", "pattern", "noise"))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    if kind == "gradient":
        a = r.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        c1, c2 = np.array(_colour(r), np.float32), np.array(_colour(r), np.float32)
        arr = c1 * (1 - t[..., None]) + c2 * t[..., None]
    elif kind == "blobs":
        k = r.randint(3, 8)
        small = Image.fromarray(nr.integers(0, 256, (k, k, 3), dtype=np.uint8))
        arr = np.asarray(small.resize((size, size), Image.Resampling.BICUBIC), np.float32)
    elif kind == "photo":  # sky over ground, a horizon, soft texture: a landscape-ish photo
        horizon = r.uniform(0.35, 0.75)
        sky = np.array(
            r.choice([(120, 170, 230), (200, 210, 225), (250, 190, 140), (60, 70, 110)]), np.float32
        )
        ground = np.array(
            r.choice([(70, 120, 60), (150, 130, 100), (90, 90, 95), (200, 190, 160)]), np.float32
        )
        top = sky * (0.75 + 0.35 * yy[..., None] / horizon)
        arr = np.where(yy[..., None] < horizon, top, ground * (0.7 + 0.4 * yy[..., None]))
        tex = Image.fromarray(nr.integers(0, 256, (size // 6 + 1, size // 6 + 1), dtype=np.uint8))
        tex = np.asarray(tex.resize((size, size), Image.Resampling.BILINEAR), np.float32)
        arr = arr + (tex[..., None] - 128) * 0.25
    elif kind == "pattern":
        period = r.randint(8, 40)
        c1, c2 = np.array(_colour(r), np.float32), np.array(_colour(r), np.float32)
        if r.random() < 0.5:
            m = ((xx * size // period).astype(int) + (yy * size // period).astype(int)) % 2
        else:
            a = r.uniform(0, math.pi)
            m = ((xx * math.cos(a) + yy * math.sin(a)) * size / period).astype(int) % 2
        arr = np.where(m[..., None] == 1, c1, c2)
    else:
        base = np.array(_colour(r), np.float32)
        arr = base + nr.normal(0, r.uniform(15, 50), (size, size, 3)).astype(np.float32)
    if r.random() < 0.5:
        arr = arr + nr.normal(0, r.uniform(3, 12), arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _decoy_colour(r: random.Random) -> RGB:
    spec = MARKS[r.choice(sorted(MARKS))]
    return r.choice((spec.fill, spec.accent))


def _clutter(img: Image.Image, r: random.Random, n: int) -> None:
    """Shapes, lines and words; some in the marks' colours (decoys) but never a mark."""
    size = img.size[0]
    d = ImageDraw.Draw(img)
    for _ in range(n):
        colour = _decoy_colour(r) if r.random() < 0.3 else _colour(r)
        kind = r.random()
        w = size * r.uniform(0.05, 0.35)
        x, y = r.uniform(-0.1, 0.95) * size, r.uniform(-0.1, 0.95) * size
        if kind < 0.45:
            _draw_shape(
                d, r.choice(SHAPES), (x, y, x + w, y + w * r.uniform(0.5, 1.5)), fill=colour
            )
        elif kind < 0.65:
            d.line(
                [(x, y), (r.uniform(0, size), r.uniform(0, size))],
                fill=colour,
                width=r.randint(1, max(2, size // 40)),
            )
        else:
            word = (
                r.choice(WORDS)
                if r.random() < 0.7
                else "".join(r.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(r.randint(1, 3)))
            )
            d.text((x, y), word, font=font(int(size * r.uniform(0.05, 0.18))), fill=colour)


def _decoys(img: Image.Image, r: random.Random, brand: str | None) -> None:
    """Hard negatives: a brand's colours in another shape, or its shape without its letters."""
    size = img.size[0]
    d = ImageDraw.Draw(img)
    for _ in range(r.randint(0, 2)):
        spec = MARKS[r.choice(sorted(MARKS))]
        w = size * r.uniform(0.1, 0.3)
        x, y = r.uniform(0, size - w), r.uniform(0, size - w)
        shape = r.choice([s for s in SHAPES if s != spec.shape])
        if r.random() < 0.5:
            _draw_shape(
                d,
                shape,
                (x, y, x + w, y + w),
                fill=spec.fill,
                outline=spec.accent,
                width=max(1, int(w * 0.06)),
            )
        else:  # right shape and colour, but no ring and a different letter
            _draw_shape(d, spec.shape, (x, y, x + w, y + w), fill=spec.fill)
            letter = r.choice("BDEKMRSUVWXZ")
            d.text(
                (x + w / 2, y + w / 2),
                letter,
                font=font(int(w * 0.45)),
                fill=_colour(r),
                anchor="mm",
            )


def _jitter_mark(mark: Image.Image, r: random.Random) -> Image.Image:
    arr = np.asarray(mark, np.float32).copy()
    gain = r.uniform(0.75, 1.2)
    shift = np.array([r.uniform(-18, 18) for _ in range(3)], np.float32)
    arr[..., :3] = np.clip(arr[..., :3] * gain + shift, 0, 255)
    return Image.fromarray(arr.astype(np.uint8), "RGBA")


def _paste_mark(img: Image.Image, r: random.Random, brand: str) -> None:
    size = img.size[0]
    side = max(8, int(size * r.uniform(0.15, 0.6)))
    mark = mark_image(brand).resize((side, side), Image.Resampling.BILINEAR)
    mark = mark.rotate(r.uniform(-30, 30), resample=Image.Resampling.BICUBIC, expand=True)
    mark = _jitter_mark(mark, r)
    mw, mh = mark.size
    x = r.randint(0, max(0, size - mw))
    y = r.randint(0, max(0, size - mh))
    img.paste(mark, (x, y), mark)
    if r.random() < 0.4:  # occlude one edge of the mark, at most about a quarter of it
        d = ImageDraw.Draw(img)
        ow, oh = mw * r.uniform(0.15, 0.4), mh * r.uniform(0.15, 0.6)
        edge = r.choice("lrtb")
        ox = (
            x - ow * 0.3
            if edge == "l"
            else x + mw - ow * 0.7
            if edge == "r"
            else x + r.uniform(0, mw - ow)
        )
        oy = (
            y - oh * 0.3
            if edge == "t"
            else y + mh - oh * 0.7
            if edge == "b"
            else y + r.uniform(0, mh - oh)
        )
        box = (ox, oy, ox + ow, oy + oh)
        if r.random() < 0.5:
            d.rectangle(box, fill=_colour(r))
        else:
            d.ellipse(box, fill=_colour(r))


def render_scene(
    rng: random.Random | np.random.Generator, brand: str | None, size: int = 299
) -> Image.Image:
    """An RGB scene of side `size`: `brand`'s mark among clutter, or clutter only for None."""
    r = _as_random(rng)
    nr = np.random.default_rng(r.getrandbits(64))
    img = _background(r, nr, size)
    _clutter(img, r, r.randint(2, 9))
    _decoys(img, r, brand)
    if brand is not None:
        _paste_mark(img, r, brand)
    img = ImageEnhance.Brightness(img).enhance(r.uniform(0.8, 1.2))
    img = ImageEnhance.Contrast(img).enhance(r.uniform(0.8, 1.2))
    if r.random() < 0.25:
        img = img.filter(ImageFilter.GaussianBlur(r.uniform(0.3, 1.2)))
    return img


def scene_jpeg(seed: int, brand: str | None, size: int = 299, quality: int = 90) -> bytes:
    """JPEG bytes of `render_scene(random.Random(seed), brand, size)`: deterministic."""
    img = render_scene(random.Random(seed), brand, size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()
