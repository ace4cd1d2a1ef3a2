"""Shared helpers for the ingestion tests: images, table snapshots, configs."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

from PIL import Image
from sqlalchemy import select

from pipeline.schema import dirty_days, images, post_images, posts, quarantine

BRANDS = [{"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"]}]


def jpeg(w: int = 64, h: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png(w: int = 40, h: int = 30, color: tuple[int, int, int] = (10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def gif(w: int = 20, h: int = 20) -> bytes:
    frames = [Image.new("P", (w, h), i) for i in (1, 2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def webp(w: int = 30, h: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (0, 0, 255)).save(buf, "WEBP")
    return buf.getvalue()


def noisy_jpeg(w: int = 256, h: int = 256) -> bytes:
    import random

    rnd = random.Random(1)
    im = Image.frombytes("RGB", (w, h), bytes(rnd.getrandbits(8) for _ in range(w * h * 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    data = noisy_jpeg(128, 128)
    return data[: len(data) // 2]


def png_header_only(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def config(sources: list[dict[str, Any]], private: bool = True, **network: Any) -> dict[str, Any]:
    net = {"max_retries": 3, "timeout_s": 5, "image_workers": 4, "per_host_connections": 2, **network}
    if private:
        net["allowed_private_hosts"] = ["127.0.0.1"]
    return {"brands": BRANDS, "sources": sources, "network": net}


def snapshot(ctx: Any, volatile: bool = False) -> dict[str, set[tuple[Any, ...]]]:
    """Table contents by natural keys. volatile=True also keeps ids and timestamps."""
    with ctx.engine.connect() as conn:
        prow = {r.id: (r.platform, r.external_id) for r in conn.execute(select(posts.c.id, posts.c.platform, posts.c.external_id))}
        pcols = [c for c in posts.c if volatile or c.name not in ("id", "ingested_at", "updated_at")]
        icols = [c for c in post_images.c if volatile or c.name not in ("id", "post_id", "updated_at", "attempts")]
        out = {
            "posts": {tuple(r) for r in conn.execute(select(*pcols))},
            "post_images": {(*prow[r.post_id], *tuple(r)[2:]) for r in conn.execute(select(post_images.c.id, post_images.c.post_id, *icols))},
            "images": {tuple(r) for r in conn.execute(select(*[c for c in images.c if volatile or c.name != "created_at"]))},
            "quarantine": {tuple(r) for r in conn.execute(select(*[c for c in quarantine.c if volatile or c.name not in ("id", "created_at")]))},
            "dirty_days": {r.day for r in conn.execute(select(dirty_days.c.day))},
        }
    out["lake"] = set(ctx.store.list(""))
    return out


def count(ctx: Any, table: Any, *where: Any) -> int:
    from sqlalchemy import func

    with ctx.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table).where(*where)).scalar() or 0)
