"""The photos behind a day's image mentions: the report's gallery and `brandmon evidence`.

For one brand and UTC day: the top images the *active* model counted (a class mapped to the
brand by `logo_class_map`, score at or above the model's threshold) in that day's posts, and
the near-threshold ones waiting in `review_queue`, each with its detection box (stored by
the detector in original-image pixels; NULL when the CNN alone called it), score, post link
and platform. Thumbnails are made once per image and size into the lake
(`thumbs/sha256/ab/cd/<sha>_<size>.jpg`, model-independent: the box is drawn over them by
the report, or into the exported copy), so re-rendering a report decodes nothing new.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import and_, select

from pipeline.aggregate.mentions import active_model, day_bounds
from pipeline.context import Context
from pipeline.errors import BrandmonError
from pipeline.schema import detections, images, logo_class_map, post_images, posts, review_queue

log = logging.getLogger(__name__)

TOP_IMAGES = 8  # counted images per brand in the report
TOP_REVIEW = 6  # near-threshold images per brand in the report
THUMB_SIZE = 320  # long side of a report thumbnail, pixels
MAX_THUMB_SOURCE_BYTES = 40_000_000  # originals larger than this are not fetched for a thumbnail
MAX_PIXELS = 64_000_000  # as at ingestion: larger images are never decoded
ROW_CAP = 2000  # candidate rows read per brand and day (highest scores first)
WAITING = ("pending", "exported")


class EvidenceError(BrandmonError):
    """No active model, an unwritable output folder."""


@dataclass(frozen=True)
class Evidence:
    """One image behind a brand's mentions on a day (or waiting for review)."""

    kind: str  # counted | review
    brand: str
    product: str  # '' = the brand itself
    sha256: str
    storage_key: str
    mime: str
    width: int | None
    height: int | None
    class_name: str
    score: float
    box: list[int] | None  # [x1, y1, x2, y2] in original pixels
    model_version: str
    review_status: str  # counted (not queued) | pending | exported | labelled:<label>
    post_url: str | None
    platform: str
    posted_at: Any
    posts_that_day: int  # posts of the day carrying this image


def thumb_key(sha: str, size: int = THUMB_SIZE) -> str:
    return f"thumbs/sha256/{sha[:2]}/{sha[2:4]}/{sha}_{size}.jpg"


def valid_box(box: Any, width: int | None, height: int | None) -> list[int] | None:
    """The stored box if it is four numbers with x1 < x2, y1 < y2 inside the image; else None."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        return None
    try:
        x1, y1, x2, y2 = (int(v) for v in box)
    except (TypeError, ValueError):
        return None
    if not (0 <= x1 < x2 and 0 <= y1 < y2):
        return None
    if width and height and (x2 > width or y2 > height):
        return None
    return [x1, y1, x2, y2]


def _review_label(status: str | None, label: str | None) -> str:
    if status is None:
        return "counted"
    return f"labelled:{label}" if status == "labelled" else status


def day_evidence(ctx: Context, brand: str, day: Any, top: int = TOP_IMAGES, top_review: int = TOP_REVIEW) -> list[Evidence]:
    """Counted images (best score first, up to `top`) then waiting review images (`top_review`)."""
    start, end = day_bounds(day)
    with ctx.engine.connect() as conn:
        model = active_model(conn)
        if model.version is None:
            return []
        p, pi, d, cm, im, rq = posts.c, post_images.c, detections.c, logo_class_map.c, images.c, review_queue.c
        base = (
            select(p.url, p.platform, p.posted_at, p.id.label("post_id"), pi.sha256, im.storage_key, im.mime,
                   im.width, im.height, cm.product)
            .select_from(posts.join(post_images, pi.post_id == p.id).join(images, im.sha256 == pi.sha256))
            .where(p.posted_at >= start, p.posted_at < end, pi.status == "stored", cm.brand == brand)
        )
        counted = conn.execute(
            base.add_columns(d.class_name, d.score, d.box, rq.status.label("rq_status"), rq.label.label("rq_label"))
            .join(detections, d.image_sha256 == pi.sha256).join(logo_class_map, cm.class_name == d.class_name)
            .outerjoin(review_queue, and_(rq.image_sha256 == pi.sha256, rq.model_version == d.model_version))
            .where(d.model_version == model.version, d.score >= model.threshold)
            .order_by(d.score.desc(), pi.sha256, p.posted_at, p.id).limit(ROW_CAP)
        ).all()
        queued = conn.execute(
            base.add_columns(rq.class_name, rq.score, d.box, rq.status.label("rq_status"), rq.label.label("rq_label"))
            .join(review_queue, rq.image_sha256 == pi.sha256).join(logo_class_map, cm.class_name == rq.class_name)
            .outerjoin(detections, and_(d.image_sha256 == rq.image_sha256, d.model_version == rq.model_version,
                                        d.class_name == rq.class_name))
            .where(rq.model_version == model.version, rq.status.in_(WAITING), rq.score < model.threshold)
            .order_by(rq.score.desc(), pi.sha256, p.posted_at, p.id).limit(ROW_CAP)
        ).all()
    out: list[Evidence] = []
    for kind, rows, limit in (("counted", counted, top), ("review", queued, top_review)):
        seen: dict[str, int] = {}
        picked: list[Evidence] = []
        for r in rows:  # best score first; per image the first (earliest) post links
            if r.sha256 in seen:
                seen[r.sha256] += 1
                continue
            seen[r.sha256] = 1
            if len(picked) < limit:
                picked.append(Evidence(
                    kind, brand, r.product or "", r.sha256, r.storage_key, r.mime, r.width, r.height, r.class_name,
                    float(r.score), valid_box(r.box, r.width, r.height), model.version,
                    _review_label(r.rq_status, r.rq_label), r.url, r.platform, r.posted_at, 0))
        out += [Evidence(**{**e.__dict__, "posts_that_day": seen[e.sha256]}) for e in picked]
    return out


# --- thumbnails --------------------------------------------------------------------------------


def make_thumbnail(data: bytes, size: int = THUMB_SIZE) -> tuple[bytes, int, int]:
    """(JPEG bytes of at most `size` on the long side, original width, height); bounded decode.

    Raises ValueError for an image that is too large or undecodable.
    """
    from PIL import Image

    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as img:
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # PIL's guard, as an error
            w, h = img.size
            if w <= 0 or h <= 0 or w * h > MAX_PIXELS:
                raise ValueError(f"image of {w}x{h} pixels is not thumbnailed (cap {MAX_PIXELS})")
            if img.format == "JPEG":
                img.draft("RGB", (size, size))  # decode at 1/2..1/8 scale: fast, little memory
            img.seek(0)
            small = img.convert("RGB")
            small.thumbnail((size, size), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=82, optimize=True)
            return buf.getvalue(), w, h
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"decompression bomb: {exc}"[:200]) from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"undecodable image: {exc}"[:200]) from None


def thumbnail(ctx: Context, ev: Evidence, size: int = THUMB_SIZE) -> bytes | None:
    """The image's thumbnail from the lake, made and stored on first use; None if it cannot be."""
    key = thumb_key(ev.sha256, size)
    try:
        return ctx.store.get(key)
    except KeyError:
        pass
    try:
        data = ctx.store.get(ev.storage_key)
    except KeyError:
        log.warning("gallery: image %s is missing from the lake", ev.sha256[:12])
        return None
    if len(data) > MAX_THUMB_SOURCE_BYTES:
        return None
    try:
        thumb, _, _ = make_thumbnail(data, size)
    except ValueError as exc:
        log.warning("gallery: no thumbnail for %s: %s", ev.sha256[:12], exc)
        return None
    ctx.store.put(key, thumb, content_type="image/jpeg")
    return thumb


def box_on(thumb: bytes, ev: Evidence) -> bytes:
    """The thumbnail with the detection box drawn in (for exported files, which have no overlay)."""
    from PIL import Image, ImageDraw

    if ev.box is None or not ev.width or not ev.height:
        return thumb
    with Image.open(io.BytesIO(thumb)) as img:
        img = img.convert("RGB")
        sx, sy = img.width / ev.width, img.height / ev.height
        x1, y1, x2, y2 = ev.box
        ImageDraw.Draw(img).rectangle([x1 * sx, y1 * sy, x2 * sx, y2 * sy], outline=(230, 30, 30),
                                      width=max(2, img.width // 120))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        return buf.getvalue()


# --- export ------------------------------------------------------------------------------------

CSV_FIELDS = ("kind", "file", "annotated_file", "sha256", "brand", "product", "class_name", "score", "box",
              "model_version", "review_status", "platform", "post_url", "posted_at", "posts_that_day")
_EXT = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp"}
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def csv_cell(value: str) -> str:
    """Text from data as a CSV cell a spreadsheet shows and never evaluates: a leading = + - @
    (or tab / CR) makes Excel and LibreOffice read a formula (`=HYPERLINK(...)`, `=cmd|...`), so
    such a cell gets a leading apostrophe, the spreadsheets' own mark for text (OWASP's advice)."""
    return "'" + value if value[:1] in ("=", "+", "-", "@", "\t", "\r") else value


def default_out(brand: str, day: Any) -> str:
    """`evidence-BRAND-DATE` with anything but letters, digits, . _ - replaced (a brand named
    `$x "y"` or `../z` must not become a folder name a shell or a path misreads)."""
    return _SAFE.sub("_", f"evidence-{brand}-{day.isoformat()}")


def _inside(root: Path, *parts: str) -> Path:
    """root/parts, refusing any path that resolves outside root (names come from data)."""
    target = root.joinpath(*parts).resolve()
    if not target.is_relative_to(root):
        raise EvidenceError(f"refusing to write outside {root}: {target}")
    return target


def export_evidence(ctx: Context, brand: str, day: Any, out: str | Path, top: int = 50, top_review: int = 50) -> dict[str, Any]:
    """Write originals, annotated thumbnails (box drawn) and evidence.csv to `out`; idempotent."""
    root = Path(out).resolve()
    try:
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "annotated").mkdir(exist_ok=True)
    except OSError as exc:
        raise EvidenceError(f"cannot create {root}: {exc.strerror or exc}") from None
    items = day_evidence(ctx, brand, day, top=top, top_review=top_review)
    rows, written, missing = [], 0, 0
    for ev in items:
        sha = _SAFE.sub("_", ev.sha256)[:64]
        name = f"{sha}{_EXT.get(ev.mime, '.img')}"
        ann = f"{sha}_{_SAFE.sub('_', ev.class_name)[:60]}.jpg"
        target = _inside(root, "images", name)
        file = ""
        if target.exists():
            file = f"images/{name}"
        else:
            try:
                target.write_bytes(ctx.store.get(ev.storage_key))
                written += 1
                file = f"images/{name}"
            except KeyError:
                missing += 1
        thumb = thumbnail(ctx, ev, 640)
        ann_file = ""
        if thumb is not None:
            _inside(root, "annotated", ann).write_bytes(box_on(thumb, ev))
            ann_file = f"annotated/{ann}"
        rows.append({
            "kind": ev.kind, "file": file, "annotated_file": ann_file, "sha256": ev.sha256,
            "brand": csv_cell(ev.brand), "product": csv_cell(ev.product), "class_name": csv_cell(ev.class_name),
            "score": f"{ev.score:.4f}", "box": "" if ev.box is None else " ".join(map(str, ev.box)),
            "model_version": csv_cell(ev.model_version), "review_status": csv_cell(ev.review_status),
            "platform": csv_cell(ev.platform), "post_url": csv_cell(ev.post_url or ""),
            "posted_at": ev.posted_at.isoformat() if ev.posted_at else "", "posts_that_day": ev.posts_that_day,
        })
    with _inside(root, "evidence.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return {"images": len(items), "counted": sum(e.kind == "counted" for e in items),
            "review": sum(e.kind == "review" for e in items), "written": written, "missing": missing,
            "csv": str(root / "evidence.csv")}
