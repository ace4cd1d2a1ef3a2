"""The local-feature matcher: finds a warped logo with its box, ignores clutter, round-trips."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest

from pipeline.detector.matching import (
    LEGACY_PARAMS,
    LogoMatcher,
    MatcherParams,
    _distinct,
    _query_scale,
    _resize,
    _root_sift,
    _sift,
    _to_gray,
    _verify,
    choose_threshold,
    combine,
    fit_combiner,
    logo_metrics,
    reference_views,
)


def _logo(seed: int, size: int = 160) -> np.ndarray:
    """A textured, asymmetric mark: random filled shapes and strokes (plenty of SIFT corners)."""
    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 255, np.uint8)
    for _ in range(14):
        color = tuple(int(c) for c in rng.integers(0, 200, 3))
        x1, y1 = (int(v) for v in rng.integers(0, size - 30, 2))
        w, h = (int(v) for v in rng.integers(12, 50, 2))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x1, y1), (x1 + w, y1 + h), color, -1)
        else:
            cv2.circle(img, (x1 + w // 2, y1 + h // 2), max(w, h) // 2, color, -1)
        cv2.line(img, (x1, y1 + h), (x1 + w, y1), (0, 0, 0), 2)
    return img


def _background(seed: int, size: tuple[int, int] = (360, 480)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(60, 200, (size[0] // 24, size[1] // 24, 3)).astype(np.uint8)
    bg = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(bg, (0, 0), 3)


def _paste(bg: np.ndarray, logo: np.ndarray, quad: np.ndarray) -> np.ndarray:
    """Warp `logo` onto `bg` so its corners land on `quad` (a perspective view)."""
    h, w = logo.shape[:2]
    src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
    hmat = cv2.getPerspectiveTransform(src, quad.astype(np.float32))
    size = (bg.shape[1], bg.shape[0])
    warped = cv2.warpPerspective(logo, hmat, size)
    mask = cv2.warpPerspective(np.full((h, w), 255, np.uint8), hmat, size) > 0
    out = bg.copy()
    out[mask] = warped[mask]
    return out


@pytest.fixture(scope="module")
def matcher() -> LogoMatcher:
    refs = [("Alpha", _logo(1)), ("Beta", _logo(2)), ("Beta", _logo(2)[10:150, 5:155])]
    return LogoMatcher(MatcherParams()).fit(refs)


QUAD = np.array([[150, 90], [330, 110], [320, 280], [140, 260]])


def test_finds_a_warped_logo_with_its_box(matcher: LogoMatcher):
    image = _paste(_background(7), _logo(1), QUAD)
    scores = matcher.score(image)
    assert set(scores) == {"Alpha", "Beta"}
    alpha, box = scores["Alpha"]
    assert alpha > 0.5 and scores["Beta"][0] < alpha
    x1, y1, x2, y2 = box
    # the box is where the logo was pasted, within a few pixels
    assert abs(x1 - 140) <= 8 and abs(y1 - 90) <= 8 and abs(x2 - 330) <= 8 and abs(y2 - 280) <= 8
    assert matcher.inliers(image)["Alpha"] >= matcher.params.min_inliers


def test_the_other_class_and_clutter(matcher: LogoMatcher):
    beta = matcher.score(_paste(_background(8), _logo(2), QUAD + 20))
    assert beta["Beta"][0] > 0.5 and beta["Alpha"][0] == 0.0
    # Marks it never saw (seed 3 once "verified" a frame-sized Alpha): no match, or at most
    # one at the inlier floor, far below the real matches above.
    floor_score = matcher.inliers_to_score(matcher.params.min_inliers + 1)
    for seed in range(3, 9):
        clutter = matcher.score(_paste(_background(9), _logo(seed), QUAD))
        assert all(s <= floor_score for s, _ in clutter.values()), (seed, clutter)
    tiny = matcher.score(np.zeros((8, 8, 3), np.uint8))
    assert all(s == 0.0 and b is None for s, b in tiny.values())


def test_round_trip_and_both_modes(matcher: LogoMatcher):
    image = _paste(_background(10), _logo(1), QUAD)
    again = LogoMatcher.from_bytes(matcher.to_bytes())
    assert again.classes == matcher.classes and again.n_descriptors == matcher.n_descriptors
    assert again.score(image) == matcher.score(image)
    assert again.references_per_class() == {"Alpha": 1, "Beta": 2}
    other = LogoMatcher(mode="shortlist").fit([("Alpha", _logo(1)), ("Beta", _logo(2))])
    assert other.score(image)["Alpha"][0] > 0.5
    with pytest.raises(ValueError):
        MatcherParams(mode="nearest")
    with pytest.raises(ValueError):
        LogoMatcher.from_bytes(b"not an npz")
    with pytest.raises(ValueError):
        LogoMatcher().fit([("Blank", np.full((64, 64, 3), 255, np.uint8))])


def _correspondences(m: LogoMatcher, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The query's RootSIFT descriptors and its class-aware correspondences (query kp, ref kp)."""
    p = m.params
    gray = _to_gray(image)
    g = _resize(gray, _query_scale(p, gray.shape[1], gray.shape[0]))
    _kps, desc = _sift(p, p.query_features).detectAndCompute(g, None)
    qroot = _root_sift(desc)
    nn, dist = m._index.flann.knnSearch(qroot, p.knn, params={"checks": p.flann_checks})
    qi, ri = m._class_ratio_matches(nn.astype(np.int64), np.sqrt(np.maximum(dist, 0)))
    return qroot, qi, ri


def test_rematch_gathers_a_logo_spread_over_references_of_its_class():
    # Four overlapping crops of one logo: the class-aware test shares the logo's keypoints
    # out among them; re-matching each against the whole query gives each its own.
    logo = _logo(1)
    refs = [("Alpha", logo[:120, :120]), ("Alpha", logo[40:, 40:]), ("Alpha", logo[:120, 40:]),
            ("Alpha", logo[40:, :120]), ("Beta", _logo(2)), ("Gamma", _logo(3))]
    m = LogoMatcher(MatcherParams()).fit(refs)
    assert m.params.rematch > 0 and m.params.ransac_method == "magsac"  # the defaults
    image = _paste(_background(7), logo, QUAD)
    qroot, qi, ri = _correspondences(m, image)
    q2, r2 = m._rematch(qroot, qi, ri)
    n_ref = m.n_references
    before = np.bincount(m._index.ref[ri], minlength=n_ref)
    after = np.bincount(m._index.ref[r2], minlength=n_ref)
    assert after[:4].max() > before[:4].max()  # the best Alpha reference gains correspondences
    assert len(np.unique(r2)) == len(r2)  # still one query keypoint per reference keypoint
    assert set(np.unique(m._index.ref[r2])) >= set(np.unique(m._index.ref[ri]))
    # More correspondences, same verification: the other marks still score nothing.
    scores = m.score(image)
    assert scores["Alpha"][0] > 0.9 and scores["Beta"][0] == 0.0 and scores["Gamma"][0] == 0.0
    x1, y1, x2, y2 = scores["Alpha"][1]  # the box of the best crop: inside the pasted logo
    assert x1 >= 132 and y1 >= 82 and x2 <= 338 and y2 <= 288 and (x2 - x1) * (y2 - y1) > 0.3 * 190 * 190
    # rematch=0 is the old class-aware-only behaviour: the correspondences pass unchanged.
    old = LogoMatcher(rematch=0, ransac_method="ransac").fit(refs)
    q0, r0 = old._rematch(qroot, qi, ri)
    assert np.array_equal(q0, qi) and np.array_equal(r0, ri)
    assert old.score(image)["Alpha"][0] > 0.9
    with pytest.raises(ValueError):
        MatcherParams(rematch=-1)
    with pytest.raises(ValueError):
        MatcherParams(ransac_method="lmeds")


def _with_meta(blob: bytes, edit) -> bytes:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(arrays["meta"].tobytes().decode())
    edit(meta)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()


def test_a_format_1_artifact_loads_and_scores_as_it_was_saved(matcher: LogoMatcher):
    def as_format_1(meta: dict) -> None:  # what the matcher saved before rematch/ransac_method
        meta["format"] = 1
        for key in LEGACY_PARAMS:
            del meta["params"][key]

    old = LogoMatcher.from_bytes(_with_meta(matcher.to_bytes(), as_format_1))
    assert old.params == MatcherParams(**LEGACY_PARAMS)
    assert (old.params.rematch, old.params.ransac_method) == (0, "ransac")
    legacy = LogoMatcher(MatcherParams(**LEGACY_PARAMS)).fit(
        [("Alpha", _logo(1)), ("Beta", _logo(2)), ("Beta", _logo(2)[10:150, 5:155])]
    )
    image = _paste(_background(7), _logo(1), QUAD)
    assert old.score(image) == legacy.score(image)
    # A current artifact keeps its own parameters; an unknown format is refused.
    assert LogoMatcher.from_bytes(matcher.to_bytes()).params == matcher.params
    with pytest.raises(ValueError):
        LogoMatcher.from_bytes(_with_meta(matcher.to_bytes(), lambda meta: meta.update(format=99)))


def test_combine_is_monotone_and_fit_uses_both_signals():
    base = combine({"no_logo": 0.7, "A": 0.2, "B": 0.1}, {"A": 0.0, "B": 0.0})
    more = combine({"no_logo": 0.7, "A": 0.2, "B": 0.1}, {"A": 0.8, "B": 0.0})
    assert more["A"] > base["A"] and more["B"] == base["B"]
    assert more["no_logo"] == pytest.approx(1 - max(more["A"], more["B"]))
    rng = np.random.default_rng(0)
    cnn, mat, labels = [], [], []
    for i in range(200):
        truth = ["A", "B", None][i % 3]
        cnn.append({"no_logo": 0.3, "A": 0.6 if truth == "A" else rng.uniform(0, 0.5), "B": rng.uniform(0, 0.5)})
        mat.append({"A": 0.0, "B": 0.9 if truth == "B" and rng.random() < 0.8 else 0.0})
        labels.append(truth)
    params = fit_combiner(cnn, mat, labels)
    assert params["kind"] == "logistic" and params["w_cnn"] > 0 and params["w_match"] > 0
    with pytest.raises(ValueError):
        fit_combiner(cnn[:3], mat[:3], [None, None, None])


def test_threshold_for_target_precision_and_metrics():
    scores = np.array([0.0, 0.1, 0.4, 0.5, 0.7, 0.9])
    positive = np.array([False, False, True, False, True, True])
    t = choose_threshold(scores, positive, 0.99)
    assert t == pytest.approx(0.7)
    m = logo_metrics(scores, positive, t)
    assert (m["precision"], m["recall"], m["tp"], m["fp"], m["fn"]) == (1.0, 0.6667, 2, 0, 1)


def test_root_sift_is_unit_length_and_hellinger():
    rng = np.random.default_rng(0)
    desc = rng.integers(0, 255, (5, 128)).astype(np.float32)
    root = _root_sift(desc)
    assert np.allclose(np.linalg.norm(root, axis=1), 1.0, atol=1e-4)
    # Euclidean distance of RootSIFT = Hellinger distance of the L1-normalised descriptors
    a, b = desc[0] / desc[0].sum(), desc[1] / desc[1].sum()
    hellinger = np.sqrt(2 - 2 * np.sum(np.sqrt(a * b)))
    assert np.isclose(np.linalg.norm(root[0] - root[1]), hellinger, atol=1e-4)


def test_reference_views_are_deterministic_and_map_back_to_the_crop():
    gray = _to_gray(_logo(4, 120))
    names = "tilt_l,tilt_r,tilt_t,tilt_b,lowres"
    views = reference_views(gray, names)
    again = reference_views(gray, names)
    assert len(views) == 6 and views[0][1] is None and views[0][0] is gray
    for (v1, m1), (v2, m2) in zip(views[1:], again[1:], strict=True):
        assert np.array_equal(v1, v2) and np.array_equal(m1, m2) and v1.shape == gray.shape
    # A point of the tilted view maps back to the crop pixel it was warped from.
    view, to_canon = views[1]
    to_view = np.linalg.inv(to_canon)
    pt = np.array([[[30.0, 70.0]]], np.float32)
    there = cv2.perspectiveTransform(pt, to_view)
    assert np.allclose(cv2.perspectiveTransform(there, to_canon), pt, atol=1e-3)
    x, y = (int(round(v)) for v in there[0, 0])
    assert abs(int(view[y, x]) - int(gray[70, 30])) < 60  # same content, resampled
    with pytest.raises(ValueError):
        reference_views(gray, "mirror")
    with pytest.raises(ValueError):
        MatcherParams(ref_views="tilt_l,mirror")


def test_views_add_references_in_the_crop_frame_and_still_find_the_box():
    refs = [("Alpha", _logo(1)), ("Beta", _logo(2))]
    plain = LogoMatcher(MatcherParams()).fit(refs)
    viewed = LogoMatcher(MatcherParams(ref_views="tilt_l,lowres")).fit(refs)
    assert viewed.n_references == 3 * plain.n_references
    idx = viewed._index
    assert np.all(idx.xy >= 0) and np.all(idx.xy < idx.ref_size[idx.ref])  # all in the crop's frame
    alpha, box = viewed.score(_paste(_background(7), _logo(1), QUAD))["Alpha"]
    assert alpha > 0.5
    assert abs(box[0] - 140) <= 8 and abs(box[1] - 90) <= 8 and abs(box[2] - 330) <= 8 and abs(box[3] - 280) <= 8


def test_distinct_evidence_does_not_count_one_spot_many_times():
    rng = np.random.default_rng(1)
    src = rng.uniform(5, 150, (10, 2)).astype(np.float32)
    hmat = np.array([[1.2, 0.1, 40], [-0.05, 1.1, 30], [0.0005, 0.0002, 1]])
    dst = cv2.perspectiveTransform(src[None], hmat)[0]
    # Each keypoint three times at the same spot (SIFT's one-keypoint-per-orientation), plus a
    # repeated texture: 12 reference keypoints sent to one query spot.
    src3, dst3 = np.repeat(src, 3, axis=0), np.repeat(dst, 3, axis=0)
    assert _distinct(src3, 3.0) == 10 and _distinct(np.zeros((12, 2)), 3.0) == 1
    distinct = _verify(src3, dst3, cv2.USAC_MAGSAC, MatcherParams(), 160.0, 160.0, (640, 480))
    every = _verify(src3, dst3, cv2.USAC_MAGSAC, MatcherParams(count="all"), 160.0, 160.0, (640, 480))
    assert distinct is not None and every is not None
    assert distinct[0] == 10 and every[0] == 30
    # A repeated texture: many reference keypoints, all landing on a few query spots.
    spot = np.repeat(dst[:3], 8, axis=0) + rng.uniform(-0.5, 0.5, (24, 2)).astype(np.float32)
    src_rep = rng.uniform(5, 150, (24, 2)).astype(np.float32)
    texture = _verify(src_rep, spot, cv2.USAC_MAGSAC, MatcherParams(), 160.0, 160.0, (640, 480))
    assert texture is None or texture[0] <= 3


def test_affine_fallback_rescues_a_flung_homography_only_above_its_floor():
    # 16 inliers clustered in one corner of an 80-px reference, under a strong perspective: the
    # homography fits them exactly but throws the far corners out of the frame; an affine map
    # of the same points keeps the reference in the image.
    hmat = np.array([[1.0, 0, 300], [0, 1.0, 200], [-0.01, 0.0, 1]])
    src = (np.stack(np.meshgrid(np.arange(4), np.arange(4)), -1).reshape(-1, 2) * 4.0 + 2).astype(np.float32)
    dst = cv2.perspectiveTransform(src[None], hmat)[0]
    args = (src, dst, cv2.USAC_MAGSAC)
    assert _verify(*args, MatcherParams(fallback="none"), 80.0, 80.0, (640, 480)) is None
    rescued = _verify(*args, MatcherParams(fallback="affine", fallback_min_inliers=14), 80.0, 80.0, (640, 480))
    assert rescued is not None and rescued[0] == 16
    outline = rescued[1]  # the reference's corners under the affine map, mostly in the 640x480 frame
    (x1, y1), (x2, y2) = outline.min(axis=0), outline.max(axis=0)
    inside = (min(x2, 640) - max(x1, 0)) * (min(y2, 480) - max(y1, 0))
    assert outline.shape == (4, 2) and inside >= 0.5 * (x2 - x1) * (y2 - y1)
    hull = _verify(*args, MatcherParams(fallback="hull", fallback_min_inliers=14), 80.0, 80.0, (640, 480))
    assert hull is not None and hull[0] == 16 and np.allclose(hull[1], dst)  # the box: where the inliers are
    assert _verify(*args, MatcherParams(fallback="affine", fallback_min_inliers=17), 80.0, 80.0, (640, 480)) is None


def test_a_format_2_artifact_keeps_its_raw_inlier_scoring(matcher: LogoMatcher):
    def as_format_2(meta: dict) -> None:  # saved before fallback / count / ref_views existed
        meta["format"] = 2
        for key in ("fallback", "fallback_min_inliers", "count", "distinct_px", "min_distinct", "ref_views"):
            del meta["params"][key]

    old = LogoMatcher.from_bytes(_with_meta(matcher.to_bytes(), as_format_2))
    assert (old.params.fallback, old.params.count) == ("none", "all")
    assert (old.params.rematch, old.params.ransac_method) == (matcher.params.rematch, matcher.params.ransac_method)
    image = _paste(_background(7), _logo(1), QUAD)
    assert old.inliers(image)["Alpha"] >= matcher.inliers(image)["Alpha"]  # all inliers >= distinct ones
