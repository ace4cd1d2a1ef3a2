"""Logo matching by local features: the pretraining-free second signal beside the CNN.

Why: an Inception v3 trained from scratch on a few hundred photos generalises poorly, while
a logo is a rigid, planar, textured pattern that local-feature matching with geometric
verification finds reliably from a handful of reference crops, with a box for free.

How: SIFT keypoints of every reference crop (RootSIFT descriptors) are stacked into one
FLANN kd-tree with a class label per descriptor. A query image's descriptors are searched
once (k nearest neighbours); a class-aware ratio test keeps a correspondence only when its
nearest reference descriptor of class c is clearly closer than the nearest one of any other
class. The references that gather the most of these correspondences (`rematch`) are then
matched again one by one against every query descriptor with Lowe's per-reference ratio test
(far more permissive than the class-aware one, which spreads a logo's correspondences over
many references of its class). Correspondences are grouped per reference crop and verified
with a robust homography (MAGSAC++ by default, or RANSAC); a homography of implausible shape
with many inliers is kept with its inliers as the outline (`fallback`). A class scores
``1 - exp(-(evidence - floor + 1) / scale)`` from its best-verified reference, the evidence
being its distinct inlier positions (`count`), and the reference corners projected through
the homography (or the inliers' outline) give the box. Synthetic perspective / low-resolution
views of each crop can be added (`ref_views`; off by default: on FL27 they added as many
chance matches as logos found).

``combine`` fuses the CNN's class probabilities with these scores (noisy-OR by default, or a
three-parameter logistic fitted on a validation split with ``fit_combiner``).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import cv2
import numpy as np

from pipeline.progress import Progress, of

# 2: params rematch + ransac_method; 3: fallback, count, ref_views (older formats load with
# the values they were scored with, LEGACY_PARAMS; an older reader refuses format 3)
FORMAT_VERSION = 3
# Values that reproduce the scoring of artifacts saved before a parameter existed.
LEGACY_PARAMS: dict[str, Any] = {"rematch": 0, "ransac_method": "ransac", "fallback": "none", "count": "all"}
NO_LOGO = "no_logo"

Box = list[int]
Scores = dict[str, tuple[float, Box | None]]


@dataclass(frozen=True)
class MatcherParams:
    """Knobs of the matcher; stored with the model so scores are reproducible."""

    ref_max_side: int = 240  # reference crops are resized so their long side is at most this
    ref_min_side: int = 64  # ...and their short side at least this (upscaling small crops)
    ref_features: int = 200  # keypoints kept per reference crop
    query_long_side: int = 960  # query images are resized so their long side is this...
    query_max_upscale: float = 1.5  # ...but never enlarged more than this
    query_features: int = 3000  # keypoints kept per query image
    contrast_threshold: float = 0.02  # SIFT; lower than Lowe's 0.04: logos are often faint
    # "class_ratio": class-aware ratio test over the whole library (default: on the FL27
    # validation split as precise and 4x faster than "shortlist": vote, then per-reference ratio)
    mode: str = "class_ratio"
    # class_ratio: re-match the references with the most class-aware correspondences, each
    # against the whole query with a per-reference ratio test (0: off, the format-1 behaviour;
    # 25 chosen on the FL27 validation split: recall 0.636 -> 0.748 at precision >= 0.9)
    rematch: int = 25
    shortlist: int = 40  # references verified per query (shortlist mode)
    vote_norm: bool = False  # divide votes by sqrt(reference keypoints)
    knn: int = 8  # neighbours searched per query descriptor
    ratio: float = 0.85  # Lowe ratio (per reference, or class-aware)
    flann_trees: int = 4
    flann_checks: int = 64
    min_matches: int = 6  # correspondences a reference needs before RANSAC is tried
    ransac_px: float = 6.0  # reprojection threshold, in query pixels at query_long_side
    ransac_method: str = "magsac"  # "magsac" (cv2.USAC_MAGSAC) or "ransac" (cv2.RANSAC, format 1)
    min_inliers: int = 6  # fewer verified inliers than this scores 0
    score_scale: float = 6.0  # inliers above the floor that give score 1 - 1/e
    max_scale_ratio: float = 12.0  # reject homographies squashing one axis vs the other
    min_inside: float = 0.5  # share of the projected reference's bounding box inside the image
    # what a homography with >= fallback_min_inliers inliers but an implausible shape becomes
    # (see _verify): "hull" (kept, boxed by its inliers), "affine" (refitted), "none" (format
    # <= 2). FL27 val, distinct counting: hull R 0.776 at P 0.933, affine 0.757, none 0.757
    fallback: str = "hull"
    # 14 chosen on the FL27 validation split: 10 and 12 let chance fits through (P 0.923 and
    # 0.922 at the floor), 18 no longer rescues the large logos (R 0.757)
    fallback_min_inliers: int = 14
    # evidence counted: "distinct" inlier positions or "all" inliers (format <= 2). FL27 val:
    # same recall at the floor, more at each stricter threshold (e.g. 74 vs 72 logos at 4 FP)
    count: str = "distinct"
    distinct_px: float = 3.0  # grid cell, in reference / query pixels, of "distinct" positions
    # distinct inliers scoring above 0 (the raw inliers must still reach min_inliers); 4 lets
    # the validation threshold choose: FL27 val picks it at P 0.9
    min_distinct: int = 4
    # synthetic views added per reference crop (comma-separated VIEW_NAMES; "" = the crop only)
    ref_views: str = ""

    def __post_init__(self) -> None:
        if self.mode not in ("class_ratio", "shortlist"):
            raise ValueError("mode must be class_ratio or shortlist")
        if self.knn < 2:
            raise ValueError("knn must be >= 2 for the ratio test")
        if not 0 < self.ratio <= 1:
            raise ValueError("ratio must be in (0, 1]")
        if self.min_matches < 4 or self.min_inliers < 4:
            raise ValueError("a homography needs at least 4 matches")
        if self.rematch < 0:
            raise ValueError("rematch must be >= 0")
        if self.ransac_method not in ("magsac", "ransac"):
            raise ValueError("ransac_method must be magsac or ransac")
        for v in (n.strip() for n in self.ref_views.split(",") if n.strip()):
            if v not in VIEW_NAMES:
                raise ValueError(f"unknown reference view {v!r}")
        if self.fallback not in ("affine", "hull", "none"):
            raise ValueError("fallback must be affine, hull or none")
        if self.count not in ("distinct", "all"):
            raise ValueError("count must be distinct or all")
        if self.min_distinct < 1 or self.distinct_px <= 0:
            raise ValueError("min_distinct must be >= 1 and distinct_px > 0")


@dataclass
class _Index:
    """Reference descriptors stacked over all references, with their owners."""

    desc: np.ndarray  # (N, 128) uint8 SIFT descriptors (RootSIFT is derived on load)
    xy: np.ndarray  # (N, 2) float32 keypoint positions in the reference's resized frame
    ref: np.ndarray  # (N,) int32 reference index of each descriptor
    ref_class: np.ndarray  # (R,) int32 class index of each reference
    ref_size: np.ndarray  # (R, 2) float32 (w, h) of each resized reference
    flann: Any = field(default=None, repr=False)
    ref_start: np.ndarray | None = field(default=None, repr=False)
    ref_count: np.ndarray | None = field(default=None, repr=False)
    root: np.ndarray | None = field(default=None, repr=False)


def _to_gray(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray):
        raise TypeError("image must be a numpy array")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    raise ValueError(f"image must be HxW, HxWx3 or HxWx4, got shape {image.shape}")


def _resize(gray: np.ndarray, scale: float) -> np.ndarray:
    if abs(scale - 1.0) < 1e-6:
        return gray
    h, w = gray.shape
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(gray, size, interpolation=interp)


def _root_sift(desc: np.ndarray) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman): L1-normalise then sqrt; Euclidean = Hellinger."""
    d = desc.astype(np.float32)
    d /= d.sum(axis=1, keepdims=True) + 1e-7
    return np.sqrt(d)


def _sift(params: MatcherParams, n_features: int) -> Any:
    return cv2.SIFT_create(nfeatures=n_features, contrastThreshold=params.contrast_threshold)


def _ref_scale(params: MatcherParams, w: int, h: int) -> float:
    scale = min(1.0, params.ref_max_side / max(w, h))
    if min(w, h) * scale < params.ref_min_side:
        scale = min(params.ref_min_side / min(w, h), params.ref_max_side / max(w, h), 4.0)
    return max(scale, 1e-3)


# Synthetic reference views (name -> what it imitates); see `reference_views`.
VIEW_NAMES = ("tilt_l", "tilt_r", "tilt_t", "tilt_b", "lowres")
TILT = 0.3  # far edge shrunk by this share: a logo seen ~35-45 degrees off-axis
LOWRES = 0.35  # the crop shrunk to this share and enlarged back: a small, soft logo


def reference_views(gray: np.ndarray, names: str) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The crop itself, then one synthetic view per comma-separated name in `names`.

    Each view comes with the 3x3 map from its pixels back to the crop's (None for the crop
    itself), so every view's keypoints live in one frame and a verified homography projects
    the crop's corners whatever view matched. Deterministic (no random draw): the same crop
    always gives the same library. Why: SIFT is invariant to rotation and scale but only
    partly to strong perspective and to the blur of a logo a few dozen pixels wide; the
    training boxes are mostly frontal and sharp, photos to search are often neither.
    """
    h, w = gray.shape
    out: list[tuple[np.ndarray, np.ndarray | None]] = [(gray, None)]
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "lowres":
            small = _resize(gray, max(LOWRES, 16 / min(w, h)))
            view = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
            out.append((view, np.eye(3, dtype=np.float64)))
            continue
        dx, dy = TILT * w / 2, TILT * h / 2
        quads = {
            "tilt_l": [[0, dy], [w, 0], [w, h], [0, h - dy]],  # left edge farther away
            "tilt_r": [[0, 0], [w, dy], [w, h - dy], [0, h]],
            "tilt_t": [[dx, 0], [w - dx, 0], [w, h], [0, h]],
            "tilt_b": [[0, 0], [w, 0], [w - dx, h], [dx, h]],
        }
        if name not in quads:
            raise ValueError(f"unknown reference view {name!r} (known: {', '.join(VIEW_NAMES)})")
        to_view = cv2.getPerspectiveTransform(corners, np.array(quads[name], np.float32))
        view = cv2.warpPerspective(gray, to_view, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append((view, np.linalg.inv(to_view)))
    return out


def _query_scale(params: MatcherParams, w: int, h: int) -> float:
    return min(params.query_long_side / max(w, h), params.query_max_upscale)


def _homography_ok(
    hmat: np.ndarray, ref_w: float, ref_h: float, params: MatcherParams, image_wh: tuple[int, int] | None = None
) -> bool:
    """Reject degenerate or mirrored homographies: real logos are seen as convex quads.

    Also reject a reference projected mostly outside the image (`min_inside`): a handful of
    chance inliers in one corner often "verify" a homography that blows the logo up past the
    frame, while a logo in a photo is mostly in the photo.
    """
    if hmat is None or not np.all(np.isfinite(hmat)):
        return False
    corners = np.array([[0, 0], [ref_w, 0], [ref_w, ref_h], [0, ref_h]], np.float32)
    quad = cv2.perspectiveTransform(corners[None], hmat)[0]
    if not np.all(np.isfinite(quad)):
        return False
    # Convex and consistently oriented (no mirroring, no bow-tie).
    edges = np.roll(quad, -1, axis=0) - quad
    nxt = np.roll(edges, -1, axis=0)
    cross = edges[:, 0] * nxt[:, 1] - edges[:, 1] * nxt[:, 0]
    if not (np.all(cross > 0) or np.all(cross < 0)):
        return False
    if np.all(cross < 0):  # image y axis points down: the reference corners go clockwise (>0)
        return False
    sides = np.linalg.norm(edges, axis=1)
    if sides.min() < 4:
        return False
    # Opposite sides of similar length, aspect not crushed.
    if max(sides[0] / sides[2], sides[2] / sides[0], sides[1] / sides[3], sides[3] / sides[1]) > 4:
        return False
    sx, sy = (sides[0] + sides[2]) / (2 * ref_w), (sides[1] + sides[3]) / (2 * ref_h)
    if max(sx / sy, sy / sx) > params.max_scale_ratio:
        return False
    if image_wh is not None and params.min_inside > 0:
        (x1, y1), (x2, y2) = quad.min(axis=0), quad.max(axis=0)
        iw = max(0.0, min(x2, image_wh[0]) - max(x1, 0.0))
        ih = max(0.0, min(y2, image_wh[1]) - max(y1, 0.0))
        if iw * ih < params.min_inside * (x2 - x1) * (y2 - y1):
            return False
    return True


def _distinct(points: np.ndarray, cell: float) -> int:
    """How many distinct positions `points` hold on a `cell`-pixel grid."""
    return len(np.unique(np.floor(points / cell).astype(np.int64), axis=0)) if len(points) else 0


def _verify(
    src: np.ndarray, dst: np.ndarray, method: int, p: MatcherParams, ref_w: float, ref_h: float,
    image_wh: tuple[int, int],
) -> tuple[int, np.ndarray] | None:
    """(evidence, outline) of one reference's correspondences, or None if unverified; the
    outline is the reference's corners (or its inliers, `fallback="hull"`) in query pixels.

    A homography first. When it has at least `fallback_min_inliers` inliers but an implausible
    shape, `fallback` decides: "hull" keeps the match and outlines the inliers themselves,
    "affine" refits an affine map to the same correspondences, "none" rejects it. Why: a logo
    filling much of the photo, or inliers clustered on part of it, give a homography whose
    perspective terms fling the reference's corners far outside the frame (FL27 validation: a
    Starbucks with 40 correct inliers, a FedEx with 17, rejected by the shape checks), while
    that many inliers are rarely chance. The floor is high because chance fits of a few
    matches often have implausible shapes (that is what the checks are for).

    The evidence is the inlier count, or with ``count="distinct"`` the number of distinct
    inlier positions on a `distinct_px` grid, the smaller of the reference's and the query's.
    Why: SIFT puts several keypoints on one blob (one per dominant orientation) and repeated
    texture (letters of a word, a stripe) sends many of them to one spot, so raw counts
    reward a few blobs; distinct positions count independent evidence only.
    """
    hmat, mask = cv2.findHomography(src, dst, method, p.ransac_px, maxIters=500)
    if hmat is None:
        return None
    inl = mask.ravel().astype(bool)
    if inl.sum() < p.min_inliers:
        return None
    corners = np.array([[0, 0], [ref_w, 0], [ref_w, ref_h], [0, ref_h]], np.float32)
    if _homography_ok(hmat, ref_w, ref_h, p, image_wh):
        outline = cv2.perspectiveTransform(corners[None], hmat)[0]
    elif p.fallback == "none" or inl.sum() < max(p.min_inliers, p.fallback_min_inliers):
        return None
    elif p.fallback == "hull":
        outline = dst[inl]  # the logo is at least where its inliers are
    else:
        amat, amask = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=p.ransac_px, maxIters=500, refineIters=10
        )
        if amat is None:
            return None
        hmat, inl = np.vstack([amat, [0.0, 0.0, 1.0]]), amask.ravel().astype(bool)
        if inl.sum() < max(p.min_inliers, p.fallback_min_inliers) or not _homography_ok(hmat, ref_w, ref_h, p, image_wh):
            return None
        outline = cv2.perspectiveTransform(corners[None], hmat)[0]
    n = int(inl.sum())
    if p.count == "distinct":
        n = min(n, _distinct(src[inl], p.distinct_px), _distinct(dst[inl], p.distinct_px))
    return n, outline


class LogoMatcher:
    """Reference logo crops → per-class match scores and boxes on any image."""

    def __init__(self, params: MatcherParams | None = None, **overrides: Any) -> None:
        base = params or MatcherParams()
        self.params = replace(base, **overrides) if overrides else base
        self.classes: list[str] = []
        self._index: _Index | None = None

    # ----------------------------------------------------------------- building
    def fit(self, refs: Iterable[tuple[str, np.ndarray]]) -> LogoMatcher:
        """Extract features of every reference crop (class name, uint8 RGB crop)."""
        p = self.params
        sift = _sift(p, p.ref_features)
        classes: dict[str, int] = {}
        descs, xys, owners, ref_class, ref_size = [], [], [], [], []
        for name, crop in refs:
            gray = _to_gray(crop)
            h, w = gray.shape
            if min(h, w) < 8:
                continue
            scale = _ref_scale(p, w, h)
            g = _resize(gray, scale)
            cls_seen = str(name) in classes
            for view, to_canon in reference_views(g, p.ref_views):
                kps, desc = sift.detectAndCompute(view, None)
                if desc is None or len(kps) < p.min_inliers:
                    if to_canon is None:
                        break  # the crop itself has too few keypoints: skip it and its views
                    continue
                xy = np.array([k.pt for k in kps], np.float32)
                if to_canon is not None:  # keypoints of a warped view, in the crop's own frame
                    xy = cv2.perspectiveTransform(xy[None], to_canon)[0]
                    inside = (xy[:, 0] >= 0) & (xy[:, 1] >= 0) & (xy[:, 0] < g.shape[1]) & (xy[:, 1] < g.shape[0])
                    if inside.sum() < p.min_inliers:
                        continue
                    xy, desc = xy[inside], desc[inside]
                if not cls_seen:
                    classes.setdefault(str(name), len(classes))
                    cls_seen = True
                r = len(ref_class)
                descs.append(np.clip(desc, 0, 255).astype(np.uint8))
                xys.append(xy.astype(np.float32))
                owners.append(np.full(len(xy), r, np.int32))
                ref_class.append(classes[str(name)])
                ref_size.append((g.shape[1], g.shape[0]))
        if not ref_class:
            raise ValueError("no usable reference crop (each needs a few SIFT keypoints)")
        self.classes = list(classes)
        self._index = _Index(
            desc=np.concatenate(descs),
            xy=np.concatenate(xys),
            ref=np.concatenate(owners),
            ref_class=np.array(ref_class, np.int32),
            ref_size=np.array(ref_size, np.float32),
        )
        self._build()
        return self

    def _build(self) -> None:
        idx = self._require()
        idx.root = _root_sift(idx.desc)
        n_ref = len(idx.ref_class)
        idx.ref_count = np.bincount(idx.ref, minlength=n_ref)
        idx.ref_start = np.concatenate([[0], np.cumsum(idx.ref_count)[:-1]]).astype(np.int64)
        if not np.all(np.diff(idx.ref) >= 0):
            raise ValueError("reference descriptors must be stored grouped by reference")
        # FLANN's randomised kd-trees draw from OpenCV's RNG: seed it so a model rebuilt
        # from bytes searches exactly like the one that was saved.
        cv2.setRNGSeed(12345)
        idx.flann = cv2.flann_Index(idx.root, {"algorithm": 1, "trees": self.params.flann_trees})

    def _require(self) -> _Index:
        if self._index is None:
            raise RuntimeError("LogoMatcher is not fitted")
        return self._index

    @property
    def n_references(self) -> int:
        return len(self._require().ref_class)

    @property
    def n_descriptors(self) -> int:
        return len(self._require().desc)

    def references_per_class(self) -> dict[str, int]:
        idx = self._require()
        counts = np.bincount(idx.ref_class, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}

    # ----------------------------------------------------------------- scoring
    def score(self, image: np.ndarray) -> Scores:
        """Per class: (score in [0, 1], best box [x1, y1, x2, y2] in image pixels or None)."""
        return self._score(image)[0]

    def inliers(self, image: np.ndarray) -> dict[str, int]:
        """Verified evidence per class: distinct (or all, `count`) inliers of its best reference."""
        return self._score(image)[1]

    def score_many(
        self, images: Iterable[np.ndarray], workers: int = 1, progress: Progress | None = None
    ) -> list[Scores]:
        """Score many images; OpenCV releases the GIL, so threads use several cores."""
        items = list(images)
        bar = of(progress)(len(items), "match", "img")
        try:
            if workers <= 1:
                out = []
                for im in items:
                    out.append(self.score(im))
                    bar.update(1)
                return out
            with ThreadPoolExecutor(max_workers=workers) as pool:
                out = []
                for res in pool.map(self.score, items):
                    out.append(res)
                    bar.update(1)
                return out
        finally:
            bar.close()

    def _score(self, image: np.ndarray) -> tuple[Scores, dict[str, int]]:
        idx = self._require()
        p = self.params
        empty: Scores = {c: (0.0, None) for c in self.classes}
        counts = dict.fromkeys(self.classes, 0)
        gray = _to_gray(image)
        H, W = gray.shape
        if min(H, W) < 16:
            return empty, counts
        scale = _query_scale(p, W, H)
        g = _resize(gray, scale)
        kps, desc = _sift(p, p.query_features).detectAndCompute(g, None)
        if desc is None or len(kps) < p.min_inliers:
            return empty, counts
        qxy = np.array([k.pt for k in kps], np.float32)
        qroot = _root_sift(desc)
        nn, dist = idx.flann.knnSearch(qroot, p.knn, params={"checks": p.flann_checks})
        nn = nn.astype(np.int64)
        dist = np.sqrt(np.maximum(dist, 0))  # FLANN L2 returns squared distances
        if p.mode == "shortlist":
            qi, ri = self._shortlist_matches(qroot, nn)
        else:
            qi, ri = self._class_ratio_matches(nn, dist)
            if p.rematch > 0:
                qi, ri = self._rematch(qroot, qi, ri)
        if len(qi) < p.min_matches:
            return empty, counts
        refs = idx.ref[ri]
        best: dict[int, tuple[int, Box | None]] = {}
        order = np.argsort(refs, kind="stable")
        qi, ri, refs = qi[order], ri[order], refs[order]
        ref_ids, starts, lens = np.unique(refs, return_index=True, return_counts=True)
        cand = np.argsort(-lens, kind="stable")
        method = cv2.USAC_MAGSAC if p.ransac_method == "magsac" else cv2.RANSAC
        for c in cand:
            n = int(lens[c])
            if n < p.min_matches:
                break
            r = int(ref_ids[c])
            cls = int(idx.ref_class[r])
            if cls in best and best[cls][0] >= n:
                continue  # cannot beat this class's best with fewer matches than its inliers
            s = slice(int(starts[c]), int(starts[c]) + n)
            src = idx.xy[ri[s]]
            dst = qxy[qi[s]]
            rw, rh = idx.ref_size[r]
            found = _verify(src, dst, method, p, float(rw), float(rh), (g.shape[1], g.shape[0]))
            if found is None or (cls in best and best[cls][0] >= found[0]):
                continue
            n_in, outline = found
            quad = outline / scale
            x1, y1 = np.clip(quad.min(axis=0), 0, [W, H])
            x2, y2 = np.clip(quad.max(axis=0), 0, [W, H])
            box = [int(round(x1)), int(round(y1)), int(round(x2)), int(round(y2))]
            if box[2] - box[0] < 2 or box[3] - box[1] < 2:
                continue
            best[cls] = (n_in, box)

        out = dict(empty)
        for cls, (n_in, box) in best.items():
            name = self.classes[cls]
            counts[name] = n_in
            out[name] = (self.inliers_to_score(n_in), box)
        return out, counts

    def _class_ratio_matches(self, nn: np.ndarray, dist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Correspondences whose class-c neighbour beats every other class by the ratio."""
        idx, p = self._require(), self.params
        owner_class = idx.ref_class[idx.ref[nn]]  # (Q, k)
        other = owner_class != owner_class[:, :1]
        # Distance to the nearest descriptor of another class (the last neighbour if none).
        first_other = np.where(other.any(axis=1), other.argmax(axis=1), p.knn - 1)
        d_other = dist[np.arange(len(nn)), first_other]
        keep = (~other) & (dist < p.ratio * d_other[:, None])
        qi, kj = np.nonzero(keep)
        ri = nn[qi, kj]
        refs, dd = idx.ref[ri], dist[qi, kj]
        # One correspondence per (query keypoint, reference) and per reference keypoint:
        # the nearest wins, so repeated texture cannot inflate the inlier count.
        order = np.lexsort((dd, refs))
        qi, ri, refs, dd = qi[order], ri[order], refs[order], dd[order]
        _, first = np.unique(np.stack([refs, qi]), axis=1, return_index=True)
        sel = np.sort(first)
        qi, ri, dd = qi[sel], ri[sel], dd[sel]
        order = np.lexsort((dd, ri))
        qi, ri = qi[order], ri[order]
        _, first = np.unique(ri, return_index=True)
        return qi[first], ri[first]

    def _rematch(self, qroot: np.ndarray, qi: np.ndarray, ri: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Replace the correspondences of the `rematch` references with the most class-aware
        ones (at least 2) by a per-reference Lowe match of the whole query against each.

        Why: the class-aware test keeps a query keypoint only where its nearest references
        of one class beat every other class, so a logo's correspondences end up spread over
        several references of its class, each with too few to verify; the references they
        point to are the right candidates, and within one reference the classic ratio test
        is far more permissive. RANSAC, the homography checks and the inlier floor stay.
        """
        idx, p = self._require(), self.params
        if len(qi) == 0:
            return qi, ri
        cnt = np.bincount(idx.ref[ri], minlength=len(idx.ref_class))
        top = [int(r) for r in np.argsort(-cnt, kind="stable")[: p.rematch] if cnt[r] >= 2]
        if not top:
            return qi, ri
        q2, r2 = self._lowe_matches(qroot, top)
        keep = ~np.isin(idx.ref[ri], top)
        return np.concatenate([qi[keep], q2]), np.concatenate([ri[keep], r2])

    def _shortlist_matches(self, qroot: np.ndarray, nn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vote for references with the kNN, then Lowe-match exactly against the shortlist.

        Why: a ratio test across the whole library rejects most correspondences of plain
        logos (their corners look like every other logo's); within one reference it is the
        classic, far more permissive test, and RANSAC does the rest.
        """
        idx, p = self._require(), self.params
        n_ref = len(idx.ref_class)
        owners = idx.ref[nn]  # (Q, k)
        pair = np.unique(np.arange(len(nn))[:, None] * n_ref + owners)
        votes = np.bincount(pair % n_ref, minlength=n_ref).astype(np.float64)
        if p.vote_norm:
            votes /= np.sqrt(idx.ref_count)
        order = np.argsort(-votes, kind="stable")
        short = [int(r) for r in order[: p.shortlist] if votes[r] > 0]
        return self._lowe_matches(qroot, short)

    def _lowe_matches(self, qroot: np.ndarray, short: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Per-reference Lowe ratio matches of every query descriptor against `short`."""
        idx, p = self._require(), self.params
        if not short:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        cols = np.concatenate([np.arange(idx.ref_start[r], idx.ref_start[r] + idx.ref_count[r]) for r in short])
        sims = qroot @ idx.root[cols].T  # unit vectors: d^2 = 2 - 2 cos
        qis, ris = [], []
        off = 0
        r2 = p.ratio * p.ratio
        for r in short:
            n = int(idx.ref_count[r])
            block = sims[:, off : off + n]
            off += n
            if n < 2:
                continue
            top2 = np.argpartition(-block, 1, axis=1)[:, :2]
            s2 = np.take_along_axis(block, top2, axis=1)
            first = s2.argmax(axis=1)
            s1 = s2[np.arange(len(s2)), first]
            sb = s2[np.arange(len(s2)), 1 - first]
            d1, d2 = np.maximum(0, 2 - 2 * s1), np.maximum(0, 2 - 2 * sb)
            ok = d1 < r2 * d2
            q = np.nonzero(ok)[0]
            if len(q) < p.min_matches:
                continue
            j = top2[q, first[q]]
            # One query keypoint per reference keypoint: the closest.
            o = np.lexsort((d1[q], j))
            q, j = q[o], j[o]
            _, keep = np.unique(j, return_index=True)
            qis.append(q[keep])
            ris.append(idx.ref_start[r] + j[keep])
        if not qis:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        return np.concatenate(qis), np.concatenate(ris)

    def inliers_to_score(self, n_inliers: float) -> float:
        p = self.params
        floor = p.min_distinct if p.count == "distinct" else p.min_inliers
        if n_inliers < floor:
            return 0.0
        return float(1.0 - math.exp(-(n_inliers - floor + 1) / p.score_scale))

    # ----------------------------------------------------------------- storage
    def to_bytes(self) -> bytes:
        """A compressed .npz: arrays plus JSON metadata; no pickled objects."""
        idx = self._require()
        meta = {
            "format": FORMAT_VERSION,
            "kind": "brandmon.LogoMatcher",
            "classes": self.classes,
            "params": asdict(self.params),
            "opencv": cv2.__version__,
        }
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
            desc=idx.desc,
            xy=idx.xy,
            ref=idx.ref,
            ref_class=idx.ref_class,
            ref_size=idx.ref_size,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> LogoMatcher:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("kind") != "brandmon.LogoMatcher" or meta.get("format") not in (1, 2, FORMAT_VERSION):
                raise ValueError("not a brandmon LogoMatcher artifact (or an unknown version)")
            known = {f for f in MatcherParams.__dataclass_fields__}
            # A parameter the artifact predates keeps the value it was scored with.
            stored = {**LEGACY_PARAMS, **meta["params"]}
            params = MatcherParams(**{k: v for k, v in stored.items() if k in known})
            m = cls(params)
            m.classes = list(meta["classes"])
            m._index = _Index(
                desc=z["desc"].astype(np.uint8),
                xy=z["xy"].astype(np.float32),
                ref=z["ref"].astype(np.int32),
                ref_class=z["ref_class"].astype(np.int32),
                ref_size=z["ref_size"].astype(np.float32),
            )
        m._build()
        return m


# --------------------------------------------------------------------- fusion
DEFAULT_COMBINER: dict[str, Any] = {"kind": "noisy_or", "w_cnn": 1.0, "w_match": 1.0}


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, np.float64), 1e-4, 1 - 1e-4)
    return np.log(q / (1 - q))


def combine(
    cnn_probs: dict[str, float],
    match_scores: dict[str, float],
    params: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Fuse the classifier's class probabilities with matcher scores, per brand class.

    Monotone non-decreasing in both inputs (weights are clipped at 0), so more evidence from
    either signal never lowers a class. ``no_logo`` (when the CNN gives it) becomes
    ``1 - max(fused brand score)`` so "logo or not" stays one threshold on the brands.
    Classes missing from one side count as 0 there.
    """
    prm = dict(DEFAULT_COMBINER if params is None else params)
    names = [c for c in dict.fromkeys([*cnn_probs, *match_scores]) if c != NO_LOGO]
    cnn = np.array([float(cnn_probs.get(c, 0.0)) for c in names])
    mat = np.array([float(match_scores.get(c, 0.0)) for c in names])
    cnn, mat = np.clip(cnn, 0, 1), np.clip(mat, 0, 1)
    kind = prm.get("kind", "noisy_or")
    w_cnn, w_match = (
        max(0.0, float(prm.get("w_cnn", 1.0))),
        max(0.0, float(prm.get("w_match", 1.0))),
    )
    if kind == "noisy_or":
        fused = 1 - (1 - np.clip(w_cnn, 0, 1) * cnn) * (1 - np.clip(w_match, 0, 1) * mat)
    elif kind == "logistic":
        z = float(prm.get("bias", 0.0)) + w_cnn * _logit(cnn) + w_match * mat
        fused = 1 / (1 + np.exp(-z))
    else:
        raise ValueError(f"unknown combiner kind {kind!r}")
    out = {c: float(v) for c, v in zip(names, fused, strict=True)}
    if NO_LOGO in cnn_probs:
        out[NO_LOGO] = float(1 - max(out.values(), default=0.0))
    return out


def fit_combiner(
    cnn_probs: Sequence[dict[str, float]],
    match_scores: Sequence[dict[str, float]],
    labels: Sequence[str | Iterable[str] | None],
    l2: float = 1e-2,
    iters: int = 200,
) -> dict[str, Any]:
    """Fit the logistic combiner's 3 parameters on a VALIDATION split (never the test split).

    One example per (image, brand class): target 1 when the image shows that brand.
    ``labels[i]`` is a class name, a set of names, or None/"no_logo" for a logo-free image.
    Newton's method on the L2-regularised log-loss; weights are kept non-negative.
    """
    if not (len(cnn_probs) == len(match_scores) == len(labels)):
        raise ValueError("cnn_probs, match_scores and labels must have the same length")
    xs, ys = [], []
    for cp, ms, lab in zip(cnn_probs, match_scores, labels, strict=True):
        truth = {lab} if isinstance(lab, str) else set(lab or ())
        truth.discard(NO_LOGO)
        for c in dict.fromkeys([*cp, *ms]):
            if c == NO_LOGO:
                continue
            xs.append((1.0, float(_logit(cp.get(c, 0.0))), float(ms.get(c, 0.0))))
            ys.append(1.0 if c in truth else 0.0)
    if not ys or min(ys) == max(ys):
        raise ValueError("fit_combiner needs both positive and negative (image, class) pairs")
    x, y = np.array(xs), np.array(ys)
    # Balance classes so the few positives are not drowned by (images x classes) negatives.
    wts = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean()))
    w = np.zeros(3)
    reg = np.array([0.0, l2, l2])
    for _ in range(iters):
        pr = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (wts * (pr - y)) / len(y) + reg * w
        hess = (x * (wts * pr * (1 - pr))[:, None]).T @ x / len(y) + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w = w - step
        w[1:] = np.maximum(w[1:], 0.0)
        if np.abs(step).max() < 1e-8:
            break
    return {"kind": "logistic", "bias": float(w[0]), "w_cnn": float(w[1]), "w_match": float(w[2])}


# --------------------------------------------------------------------- evaluation
def logo_metrics(scores: np.ndarray, positive: np.ndarray, threshold: float) -> dict[str, float]:
    """Logo-vs-no-logo precision/recall/F1 when "logo" means score >= threshold."""
    s, pos = np.asarray(scores, float), np.asarray(positive, bool)
    pred = s >= threshold
    tp, fp, fn = int((pred & pos).sum()), int((pred & ~pos).sum()), int((~pred & pos).sum())
    prec = tp / (tp + fp) if tp + fp else 1.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {
        "precision": round(prec, 4),
        "recall": round(rec, 4),
        "f1": round(f1, 4),
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def choose_threshold(scores: np.ndarray, positive: np.ndarray, target_precision: float) -> float:
    """Lowest threshold whose precision reaches the target (max recall); on a VALIDATION split.

    Falls back to the threshold with the best precision when the target is never reached.
    Thresholds are never below a tiny epsilon: a score of 0 means "no verified match".
    """
    s, pos = np.asarray(scores, float), np.asarray(positive, bool)
    cands = np.unique(s[s > 0])
    if len(cands) == 0:
        return 1.0
    best_t, best_p = float(cands[-1]), -1.0
    for t in cands:  # ascending: the first that reaches the target has the highest recall
        pred = s >= t
        prec = (pred & pos).sum() / max(1, pred.sum())
        if prec >= target_precision:
            return float(t)
        if prec > best_p:
            best_t, best_p = float(t), prec
    return best_t
