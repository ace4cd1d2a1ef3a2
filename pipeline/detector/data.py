"""Training data: folders and box-annotated layouts -> source images -> labelled samples.

A *source image* is one file (or one in-memory synthetic scene) with its content hash, which
decides its split. A *sample* is what the network sees: the whole image or a region of it,
with a class. Boxes become positive crops (with some context around the logo); regions away
from every box become `no_logo` crops. Pure Python + Pillow + numpy: no TensorFlow here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.detector import NO_LOGO
from pipeline.errors import BrandmonError, shown
from pipeline.safepath import UnsafePath, check_part, inside

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
FORMATS = ("folders", "boxes")
Region = tuple[int, int, int, int]  # x1, y1, x2, y2 (pixels, x2/y2 exclusive)


class DataError(BrandmonError):
    """The training or evaluation data cannot be read as the stated layout."""


@dataclass(frozen=True)
class Box:
    cls: str
    x1: int
    y1: int
    x2: int
    y2: int

    @property
    def region(self) -> Region:
        return (self.x1, self.y1, self.x2, self.y2)


@dataclass(frozen=True)
class SourceImage:
    """One photo: where its bytes are, its content hash, and what is known about it."""

    sha256: str
    path: Path | None
    label: str | None = None  # folders layout: the folder's class
    boxes: tuple[Box, ...] = ()
    origin: str = "folders"  # folders | boxes | synthetic | review
    data: bytes | None = field(default=None, repr=False, compare=False)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    @property
    def name(self) -> str:
        return self.path.name if self.path else f"{self.origin}-{self.sha256[:12]}.jpg"


@dataclass(frozen=True)
class Sample:
    """What the classifier sees: a region of a source image (None = all of it) and a class."""

    source: SourceImage
    label: str
    region: Region | None = None
    kind: str = "whole"  # whole | logo | region

    @property
    def key(self) -> str:
        """Feature-cache id: the source's content hash for a whole image, else hash + region."""
        if self.region is None:
            return self.source.sha256
        spec = f"{self.source.sha256}:{','.join(map(str, self.region))}"
        return hashlib.sha256(spec.encode()).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_class(name: str) -> str:
    """Folder/annotation class names as classes: `no_logo` in any case is the negative class."""
    name = name.strip()
    return NO_LOGO if name.casefold() in ("no_logo", "no-logo", "nologo", "none") else name


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def class_name(raw: str, where: str) -> str:
    """A class name from training data: canonical, and usable as a folder name (classes become
    folders in exports and review folders), else DataError with the reason."""
    name = canonical_class(raw)
    try:
        return check_part(name, "class name")
    except UnsafePath as exc:
        raise DataError(f"{where}: {exc}") from None


def _images_under(root: Path, base: Path) -> tuple[list[Path], int]:
    """Images under `base` that really lie inside `root` (a symlink out of it is skipped)."""
    found, outside = [], 0
    for p in sorted(base.rglob("*")):
        if _is_image(p):
            if inside(root, p):
                found.append(p)
            else:
                outside += 1
    return found, outside


# --- loaders ---------------------------------------------------------------------------------


def load_folders(root: Path | str) -> list[SourceImage]:
    """`root/<Class>/*.jpg` (and `root/no_logo/`): one labelled source image per file."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; --data needs one sub-folder per class")
    out: list[SourceImage] = []
    outside = 0
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_name(sub.name, str(sub))
        paths, skipped = _images_under(root, sub)
        outside += skipped
        for path in paths:
            out.append(SourceImage(sha256_bytes(path.read_bytes()), path, label=label, origin="folders"))
    if outside:
        log.warning("%d images under %s are symlinks to files outside it; skipped", outside, root)
    if not out:
        raise DataError(f"{root} has no images in class sub-folders (expected {root}/<Class>/*.jpg)")
    return out


_FL27_LINE = re.compile(r"^(\S+\.(?:jpe?g|png|gif|bmp|webp))\s+(\S+)\s+(\d+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)\s+(-?\d+)\s*$", re.I)


def parse_fl27_annotations(text: str) -> dict[str, list[Box]]:
    """FlickrLogos-27 lines `filename class subset x1 y1 x2 y2`; duplicate boxes collapse."""
    boxes: dict[str, list[Box]] = {}
    seen: set[tuple[str, Box]] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _FL27_LINE.match(line.strip())
        if not m:
            raise DataError(f"annotation line {lineno} is not `filename class subset x1 y1 x2 y2`: {line[:80]!r}")
        fname, cls, _subset, x1, y1, x2, y2 = m.groups()
        box = Box(class_name(cls, f"annotation line {lineno}"), int(x1), int(y1), int(x2), int(y2))
        if (fname, box) in seen:
            continue
        seen.add((fname, box))
        boxes.setdefault(fname, []).append(box)
    return boxes


def parse_json_boxes(doc: object, where: str) -> list[Box]:
    """Per-image JSON: a list of `{"xmin","ymin","xmax","ymax","classtxt","class"}` (or one)."""
    items = doc if isinstance(doc, list) else [doc]
    out: list[Box] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{where}: item {i} is not an object with xmin/ymin/xmax/ymax/classtxt")
        name = item.get("classtxt", item.get("class"))
        try:
            x1, y1, x2, y2 = (int(round(float(item[k]))) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: item {i} needs numeric xmin, ymin, xmax, ymax") from None
        if name is None or not str(name).strip():
            raise DataError(f"{where}: item {i} has no classtxt/class")
        box = Box(class_name(str(name), f"{where}: item {i}"), x1, y1, x2, y2)
        if box not in out:
            out.append(box)
    return out


def _looks_like_fl27(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8", errors="replace") as fh:
            first = next((line for line in fh if line.strip()), "")
    except OSError:
        return False
    return bool(_FL27_LINE.match(first.strip()))


class UnfitBoxes:
    """Boxes that do not fit their photo, counted while loading: training clips them to it (a
    box reaching outside, corners swapped) or drops them (outside it, zero or negative size,
    under 4 px once clipped) -- said once per data set, so a bad annotation file is noticed."""

    def __init__(self) -> None:
        self.total = self.clipped = self.dropped = 0
        self.example = ""

    def check(self, fname: str, data: bytes, boxes: Iterable[Box]) -> None:
        import io

        from PIL import Image

        boxes = list(boxes)
        self.total += len(boxes)
        try:
            with Image.open(io.BytesIO(data)) as img:  # the header only
                width, height = img.size
        except Exception:  # noqa: BLE001 - an unreadable photo is skipped (and said) when it is decoded
            return
        for b in boxes:
            kept = clip_box(b, width, height)
            if kept == b:
                continue
            if kept is None:
                self.dropped += 1
            else:
                self.clipped += 1
            if not self.example:
                self.example = (f"{fname[:60]} {b.cls[:40]} ({b.x1}, {b.y1}, {b.x2}, {b.y2}) on a {width}x{height} photo "
                                f"{'dropped' if kept is None else 'clipped to ' + str(kept.region)}")

    def warn(self, root: Path) -> None:
        if self.clipped or self.dropped:
            log.warning("%d of %d boxes under %s do not fit their photo: %d clipped to it (or corners reordered), "
                        "%d dropped (outside it, of zero or negative size, or under 4 px once clipped); e.g. %s",
                        self.clipped + self.dropped, self.total, root, self.clipped, self.dropped, self.example)


def load_boxes(root: Path | str) -> list[SourceImage]:
    """Images plus box annotations: FlickrLogos-27 text files and/or per-image JSON files.

    Images are found anywhere under `root` by file name; an image listed in an annotation
    file but missing on disk is reported (once, as a count) and skipped, and so are boxes that
    do not fit their photo (`UnfitBoxes`: clipped or dropped later, as before).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; --format boxes needs images plus annotations")
    by_name: dict[str, Path] = {}
    paths, outside = _images_under(root, root)
    for p in paths:
        by_name.setdefault(p.name, p)
    if outside:
        log.warning("%d images under %s are symlinks to files outside it; skipped", outside, root)
    boxes: dict[str, list[Box]] = {}
    for txt in sorted(root.glob("*.txt")):
        if inside(root, txt) and _looks_like_fl27(txt):
            for fname, bs in parse_fl27_annotations(txt.read_text(encoding="utf-8", errors="replace")).items():
                dest = boxes.setdefault(fname, [])
                dest.extend(b for b in bs if b not in dest)
    for name, path in by_name.items():
        sidecar = path.with_suffix(".json")
        if sidecar.is_file() and inside(root, sidecar):
            try:
                doc = json.loads(sidecar.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{sidecar}: not valid JSON ({exc})") from None
            dest = boxes.setdefault(name, [])
            dest.extend(b for b in parse_json_boxes(doc, str(sidecar)) if b not in dest)
    if not boxes:
        raise DataError(
            f"{root} has no box annotations (FlickrLogos-27 `*.txt` lines or per-image `<image>.json`)"
        )
    out: list[SourceImage] = []
    missing = 0
    unfit = UnfitBoxes()
    for fname in sorted(boxes):
        path = by_name.get(fname)
        if path is None:
            missing += 1
            continue
        data = path.read_bytes()
        unfit.check(fname, data, boxes[fname])
        out.append(SourceImage(sha256_bytes(data), path, boxes=tuple(boxes[fname]), origin="boxes"))
    if missing:
        log.warning("%d annotated images not found under %s; skipped", missing, root)
    unfit.warn(root)
    if not out:
        raise DataError(f"none of the annotated images were found under {root}")
    return out


def load_sources(root: Path | str, fmt: str = "folders") -> list[SourceImage]:
    if fmt == "folders":
        return load_folders(root)
    if fmt == "boxes":
        return load_boxes(root)
    raise DataError(f"unknown data format {shown(fmt)}; use one of {', '.join(FORMATS)}")


def synthetic_negatives(n: int, size: int = 299, seed: int = 0) -> list[SourceImage]:
    """`n` logo-free synthetic scenes (clutter and decoys only) from `pipeline.synthetic`."""
    from pipeline.synthetic import scene_jpeg

    out = []
    for i in range(n):
        data = scene_jpeg(1_000_003 * (seed + 1) + 2 * i + 1, None, size=size)
        out.append(SourceImage(sha256_bytes(data), None, label=NO_LOGO, origin="synthetic", data=data))
    return out


# --- decoding and geometry -------------------------------------------------------------------


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 array (first frame; alpha dropped)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def clip_box(box: Box, width: int, height: int) -> Box | None:
    x1, x2 = sorted((max(0, min(width, box.x1)), max(0, min(width, box.x2))))
    y1, y2 = sorted((max(0, min(height, box.y1)), max(0, min(height, box.y2))))
    if x2 - x1 < 4 or y2 - y1 < 4:
        return None
    return Box(box.cls, x1, y1, x2, y2)


def with_margin(region: Region, width: int, height: int, margin: float) -> Region:
    """Grow a box by `margin` × its size on each side (context helps), clipped to the image."""
    x1, y1, x2, y2 = region
    mx, my = (x2 - x1) * margin, (y2 - y1) * margin
    return (
        max(0, int(x1 - mx)),
        max(0, int(y1 - my)),
        min(width, int(round(x2 + mx))),
        min(height, int(round(y2 + my))),
    )


def overlaps(a: Region, b: Region) -> bool:
    """Whether two (x1, y1, x2, y2) rectangles share any area."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def free_regions(
    width: int,
    height: int,
    boxes: Iterable[Region],
    n: int,
    rng: random.Random,
    min_side: int = 48,
    max_aspect: float = 2.5,
    clearance: float = 0.1,
    tries: int = 400,
) -> list[Region]:
    """Up to `n` large regions that touch no box (boxes grown by `clearance`), biggest first.

    Why sampling: the free space around several boxes is not one rectangle. Candidates are
    drawn at random (seeded by the caller), kept if they clear every box, and the largest
    mutually not-too-overlapping ones win, so the negatives look like ordinary photo regions.
    """
    grown = [with_margin(b, width, height, clearance) for b in boxes]
    if min(width, height) < min_side:
        return []
    cands: list[Region] = []
    for _ in range(tries):
        w = rng.randint(min_side, width)
        h = rng.randint(min_side, height)
        if max(w / h, h / w) > max_aspect:
            continue
        x = rng.randint(0, width - w)
        y = rng.randint(0, height - h)
        r = (x, y, x + w, y + h)
        if not any(overlaps(r, g) for g in grown):
            cands.append(r)
    cands.sort(key=lambda r: (r[2] - r[0]) * (r[3] - r[1]), reverse=True)
    chosen: list[Region] = []
    for r in cands:
        if len(chosen) >= n:
            break
        if all(_iou(r, c) < 0.3 for c in chosen):
            chosen.append(r)
    return chosen


def _iou(a: Region, b: Region) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def crop(arr: np.ndarray, region: Region | None) -> np.ndarray:
    if region is None:
        return arr
    x1, y1, x2, y2 = region
    return arr[y1:y2, x1:x2]


# --- samples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSpec:
    """How source images become samples (recorded with the model, part of its data fingerprint)."""

    margin: float = 0.15  # context around a logo box, × box size per side
    whole_positive: bool = True  # boxes layout: the whole photo also counts as its brand
    negatives_train: int = 2  # free regions per training photo
    negatives_eval: int = 1  # free regions per validation/test photo
    min_region: int = 64  # smallest negative region side (px)


def image_size(src: SourceImage) -> tuple[int, int]:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(src.read()) if src.data is not None else src.path) as img:
        return img.size


def samples_of(src: SourceImage, split: str, spec: SampleSpec, size: tuple[int, int] | None = None) -> list[Sample]:
    """The samples one source image yields for `split` (train gets more negatives)."""
    if not src.boxes:
        return [Sample(src, src.label or NO_LOGO, None, "whole")]
    width, height = size or image_size(src)
    boxes = [b for b in (clip_box(b, width, height) for b in src.boxes) if b is not None]
    out: list[Sample] = []
    if split == "train":
        for b in boxes:
            out.append(Sample(src, b.cls, with_margin(b.region, width, height, spec.margin), "logo"))
    classes = {b.cls for b in boxes}
    if boxes and len(classes) == 1 and (spec.whole_positive or split != "train"):
        out.append(Sample(src, next(iter(classes)), None, "whole"))
    n_neg = spec.negatives_train if split == "train" else spec.negatives_eval
    rng = random.Random(int(src.sha256[:16], 16))
    for r in free_regions(width, height, [b.region for b in boxes], n_neg, rng, min_side=spec.min_region):
        out.append(Sample(src, NO_LOGO, r, "region"))
    return out


def class_counts(samples: Iterable[Sample]) -> dict[str, int]:
    return dict(sorted(Counter(s.label for s in samples).items()))


def fingerprint(samples: Iterable[Sample]) -> str:
    """A hash of what was trained on: sample ids and labels, order-independent."""
    h = hashlib.sha256()
    for key, label in sorted((s.key, s.label) for s in samples):
        h.update(f"{key}\t{label}\n".encode())
    return h.hexdigest()
