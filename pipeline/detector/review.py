"""The review loop: near-threshold images out for labelling, labels back in as training data.

`export` writes `DIR/images/<sha256>.<ext>` and `DIR/manifest.csv` (sha256, file, model
version, suggested class, score, label) plus an empty folder per class. A labeller either
fills the `label` column or moves each image into its class folder (`DIR/<Class>/`,
`DIR/no_logo/`). `import` reads both (the column wins), copies each labelled image into a
`folders` training layout (default `<home>/training/review/<Class>/`) ready for
`brandmon train --data`, and marks the queue rows labelled. Both are idempotent.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from pipeline.context import Context
from pipeline.detector import NO_LOGO
from pipeline.detector.data import IMAGE_EXTS, canonical_class
from pipeline.detector.registry import active_row
from pipeline.errors import BrandmonError
from pipeline.safepath import UnsafePath, check_part, inside, safe_join
from pipeline.schema import images, review_queue, utcnow

MANIFEST = "manifest.csv"
FIELDS = ["sha256", "file", "model_version", "suggested_class", "score", "label"]
log = logging.getLogger(__name__)
_EXT = {"image/jpeg": ".jpg", "image/png": ".png", "image/gif": ".gif", "image/webp": ".webp", "image/bmp": ".bmp"}


class ReviewError(BrandmonError):
    """A review folder that cannot be read back."""


def export_queue(ctx: Context, out: str | Path, limit: int | None = None, include_exported: bool = True) -> dict[str, Any]:
    """Write the queued images and a manifest to `out`; mark the rows exported."""
    out = Path(out)
    statuses = ["pending", "exported"] if include_exported else ["pending"]
    q = (
        select(review_queue.c.image_sha256, review_queue.c.model_version, review_queue.c.class_name,
               review_queue.c.score, images.c.storage_key, images.c.mime)
        .join(images, images.c.sha256 == review_queue.c.image_sha256)
        .where(review_queue.c.status.in_(statuses))
        .order_by(review_queue.c.score.desc(), review_queue.c.image_sha256)
    )
    if limit is not None:
        q = q.limit(limit)
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(q))
        active = active_row(conn)
        classes: set[str] = {NO_LOGO, *((active or {}).get("classes") or [])}
    out.mkdir(parents=True, exist_ok=True)
    try:  # the folder is the labeller's: a planted symlink must not carry our writes outside it
        manifest_path = safe_join(out, MANIFEST, what="file")
        safe_join(out, "images", what="folder").mkdir(exist_ok=True)
    except UnsafePath as exc:
        raise ReviewError(f"review export into {out}: {exc}; remove the symlink or export into a new folder") from None
    for c in sorted({*classes, *(r.class_name for r in rows)}):
        try:
            safe_join(out, c, what="class").mkdir(exist_ok=True)
        except UnsafePath as exc:  # a class name from a model's training data
            log.warning("review export: no folder for class %r: %s", c[:80], exc)
    existing = _read_manifest(out) if manifest_path.exists() else {}
    written = 0
    missing: set[str] = set()
    for r in rows:
        name = f"{r.image_sha256}{_EXT.get(r.mime, '.jpg')}"
        target = out / "images" / name
        moved = any((out / c / name).exists() for c in classes if _plain(c))  # already sorted by the labeller
        if not target.exists() and not moved:
            try:
                target = safe_join(out, "images", name, what="file")  # e.g. a dangling symlink planted there
            except UnsafePath as exc:
                log.warning("review export: image %s not written: %s", r.image_sha256[:12], exc)
                continue
            try:
                data = ctx.store.get(r.storage_key)
            except KeyError:  # the lake lost it: nothing to label; it stays pending for a later export
                log.warning("review export: image %s is missing from the lake (%s); skipped", r.image_sha256[:12], r.storage_key)
                missing.add(r.image_sha256)
                continue
            target.write_bytes(data)
            written += 1
        prev = existing.get(r.image_sha256, {})
        existing[r.image_sha256] = {
            "sha256": r.image_sha256, "file": name, "model_version": r.model_version,
            "suggested_class": r.class_name, "score": f"{r.score:.4f}", "label": prev.get("label", ""),
        }
    tmp = manifest_path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(existing.values())
    os.replace(tmp, manifest_path)  # replaces a name, never writes through one
    shas = [r.image_sha256 for r in rows if r.image_sha256 not in missing]
    with ctx.engine.begin() as conn:
        for i in range(0, len(shas), 500):
            conn.execute(
                update(review_queue)
                .where(review_queue.c.image_sha256.in_(shas[i : i + 500]), review_queue.c.status == "pending")
                .values(status="exported", updated_at=utcnow())
            )
    return {"queued": len(rows), "written": written, "missing": len(missing), "out": str(out)}


def _plain(name: str) -> bool:
    try:
        check_part(name)
    except UnsafePath:
        return False
    return True


def _read_manifest(folder: Path) -> dict[str, dict[str, str]]:
    try:  # utf-8-sig: a spreadsheet saving "CSV UTF-8" puts a byte-order mark before `sha256`
        with (folder / MANIFEST).open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is not None and "sha256" not in reader.fieldnames:
                raise ReviewError(f"{folder / MANIFEST}: no `sha256` column (found: {', '.join(reader.fieldnames)[:200]}); "
                                  "keep the header `brandmon review export` wrote")
            return {row["sha256"]: row for row in reader if row.get("sha256")}
    except UnicodeDecodeError as exc:
        raise ReviewError(f"{folder / MANIFEST}: not UTF-8 text (byte {exc.start}); save it as CSV UTF-8") from None
    except (OSError, KeyError, csv.Error) as exc:
        raise ReviewError(f"{folder / MANIFEST}: cannot read the review manifest ({exc})") from None


def _refuse(refused: list[dict[str, str]], sha: str, reason: str) -> None:
    refused.append({"sha256": sha[:64], "reason": reason})
    log.warning("review import: row %s refused: %s", sha[:12], reason)


def import_labels(ctx: Context, folder: str | Path, into: str | Path | None = None) -> dict[str, Any]:
    """Labelled images from a review folder -> `into/<Class>/` training data; queue rows labelled.

    The manifest and the folder are the labeller's, so their labels and file names are data: a
    row whose label or file is not a plain name (`..`, `/`, NUL, a drive), or whose source or
    destination resolves outside its folder (a symlinked label folder), is refused with its
    reason (`refused` in the result) and the other rows go in.
    """
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        raise ReviewError(f"{folder} has no {MANIFEST}; point at a folder written by `brandmon review export`")
    manifest = _read_manifest(folder)
    into = Path(into) if into else Path(ctx.settings.home) / "training" / "review"
    # where the labeller put each file: DIR/<Class>/<file>; a class folder that is a symlink
    # (it could point anywhere) is not read
    placed: dict[str, str] = {}
    for sub in sorted(folder.iterdir()):
        if sub.is_symlink() or not sub.is_dir() or sub.name == "images":
            continue
        for f in sub.iterdir():
            if f.is_file() and f.suffix.lower() in IMAGE_EXTS and inside(sub, f):
                placed[f.name] = sub.name
    labelled: dict[str, str] = {}
    refused: list[dict[str, str]] = []
    copied = 0
    for sha, row in manifest.items():
        name = row.get("file") or ""
        raw_label = (row.get("label") or "").strip() or placed.get(name, "")
        if not raw_label:
            continue
        label = canonical_class(raw_label)
        try:
            check_part(label, "label")
            check_part(name, "file")
            src = safe_join(folder, "images", name, what="file")
            if not src.is_file() and name in placed:
                src = safe_join(folder, placed[name], name, what="file")
            if not src.is_file():
                continue
            dest = safe_join(into, label, name, what="label/file")
        except UnsafePath as exc:
            _refuse(refused, sha, str(exc))
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(src, dest)
            copied += 1
        labelled[sha] = label
    with ctx.engine.begin() as conn:
        for sha, label in labelled.items():
            conn.execute(
                update(review_queue).where(review_queue.c.image_sha256 == sha)
                .values(status="labelled", label=label, updated_at=utcnow())
            )
    return {"labelled": len(labelled), "copied": copied, "unlabelled": len(manifest) - len(labelled) - len(refused),
            "refused": refused, "training_dir": str(into)}
