"""Stage 3, calibrate: everything chosen is chosen on the validation split only -- the matcher's
fusion weights and each signal's decision threshold for the target precision (by default with
a margin for the split's size: `choose_thresholds`). The test split
is scored with those choices here, and only ever reported (`report`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.detector import NO_LOGO
from pipeline.detector.data import DataError
from pipeline.detector.metrics import THRESHOLD_RULES, threshold_for_precision
from pipeline.detector.training.config import FUSION_CHOICES
from pipeline.detector.training.narrate import say
from pipeline.errors import shown
from pipeline.progress import Progress

MatchScores = list[dict[str, tuple[float, Any]]]
# The matcher's scores alone, through the fused path `detect` uses (noisy-or with the CNN weighted 0)
MATCHER_ONLY: dict[str, Any] = {"kind": "noisy_or", "w_cnn": 0.0, "w_match": 1.0}


@dataclass
class Calibration:
    """The fitted matcher (or None), fusion, per-signal thresholds and the score matrices."""

    matcher: Any | None
    combiner: dict[str, Any] | None
    thresholds: dict[str, dict[str, Any]]  # signal -> threshold_for_precision's answer
    signals: dict[str, dict[str, np.ndarray]]  # val/test -> signal -> (n, n_brands)
    main: str  # the signal the model decides with: fused when there is a matcher
    fusion: dict[str, Any] | None = None  # which fusion was chosen on val, and each candidate's figures
    crop_net: Any | None = None  # the crop net when val chose to fold it into the matcher's scores
    crop: dict[str, Any] | None = None  # its merge parameters (tm, tc) for `cropnet.merge_local`

    @property
    def threshold(self) -> float:
        return float(self.thresholds[self.main]["threshold"])


def score_matrix(brands: list[str], scores: MatchScores) -> np.ndarray:
    """(n, n_brands) from per-image {brand: (score, box)} dicts (matcher or crop net)."""
    return np.array([[float(m.get(b, (0.0, None))[0]) for b in brands] for m in scores]).reshape(len(scores), len(brands))


def signal_matrices(
    brands: list[str], cnn_probs: np.ndarray, classes: list[str], match: MatchScores | None,
    combiner: dict[str, Any] | None, crop: MatchScores | None = None,
) -> dict[str, np.ndarray]:
    """Per-signal (n, n_brands) score matrices: cnn, and matcher + fused when a matcher exists
    (`matcher` is the matcher with the crop net folded in when the model has one; `crop` alone beside it)."""
    col = {c: i for i, c in enumerate(classes)}
    cnn = np.stack([cnn_probs[:, col[b]] for b in brands], axis=1) if len(cnn_probs) else np.zeros((0, len(brands)))
    out = {"cnn": cnn}
    if match is not None:
        from pipeline.detector.matching import combine

        mat = np.array([[float(m.get(b, (0.0, None))[0]) for b in brands] for m in match]).reshape(len(match), len(brands))
        out["matcher"] = mat
        fused = np.zeros_like(mat)
        for i in range(len(match)):
            cp = {c: float(cnn_probs[i, col[c]]) for c in classes}
            ms = {b: float(mat[i, j]) for j, b in enumerate(brands)}
            f = combine(cp, ms, combiner)
            fused[i] = [f.get(b, 0.0) for b in brands]
        out["fused"] = fused
    if crop is not None:
        out["crop"] = score_matrix(brands, crop)
    return out


def fit_matcher(
    refs: list[tuple[str, np.ndarray]], native: dict[str, list[np.ndarray]], val_probs: np.ndarray,
    classes: list[str], y_val: list[str], workers: int, progress: Progress | None = None,
) -> tuple[Any, dict[str, MatchScores], dict[str, Any]]:
    """The matcher on the training references, its scores on val/test, fusion fitted on val."""
    from pipeline.detector.matching import DEFAULT_COMBINER, LogoMatcher, fit_combiner

    say(progress, f"matcher: {len(refs)} reference crops from the training split")
    matcher = LogoMatcher().fit(refs)
    match = {split: matcher.score_many(native[split], workers=workers, progress=progress) for split in ("val", "test")}
    val_cnn = [{c: float(p) for c, p in zip(classes, row, strict=True)} for row in val_probs]
    val_match = [{c: s for c, (s, _b) in m.items()} for m in match["val"]]
    try:
        combiner = fit_combiner(val_cnn, val_match, y_val)
    except ValueError as exc:
        say(progress, f"matcher: default fusion (cannot fit on this validation split: {exc})")
        combiner = dict(DEFAULT_COMBINER)
    return matcher, match, combiner


def choose_thresholds(val_signals: dict[str, np.ndarray], y_val: list[str], target_precision: float,
                      rule: str = "wilson") -> dict[str, dict[str, Any]]:
    """Per signal: the lowest threshold reaching `target_precision` on val under `rule` (else best F1).

    `wilson` (default) asks the lower end of the 95% Wilson interval of val precision to reach
    the target, so the margin fits the split's size: the old `point` rule, on a 181-photo val
    split, shipped thresholds whose precision fell to 0.85 on new photos (issue #14).
    """
    val_logo = np.array([y != NO_LOGO for y in y_val])
    out: dict[str, dict[str, Any]] = {}
    for name, mat in val_signals.items():
        if not len(y_val):
            out[name] = {"threshold": 0.5, "target_met": False, "target": target_precision}
            continue
        score = mat.max(axis=1) if mat.size else np.zeros(len(y_val))
        out[name] = threshold_for_precision(val_logo, score, target_precision, rule=rule)
    return out


def choose_fusion(
    brands: list[str], val_probs: np.ndarray, classes: list[str], val_match: MatchScores, fitted: dict[str, Any],
    y_val: list[str], target_precision: float, rule: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(combiner, record): the fitted fusion or the matcher alone, whichever keeps more val
    recall at the threshold `rule` picks (the fitted one on a tie or when neither holds).

    Why: the fusion is fitted for the whole ranking, but the operating point sits at the top of
    it, where a from-scratch CNN can shuffle the matcher's sure matches with its confident
    mistakes; with a margin for the split's size that cost 0.19 recall on FL27 (bench/operating_point.py).
    """
    candidates = {"fitted": fitted, "matcher_only": MATCHER_ONLY}
    picks = {}
    for name, comb in candidates.items():
        fused = signal_matrices(brands, val_probs, classes, val_match, comb)["fused"]
        picks[name] = choose_thresholds({"fused": fused}, y_val, target_precision, rule)["fused"]

    def held(c: dict[str, Any]) -> bool:
        return bool(c.get("margin_met", c["target_met"]) if rule == "wilson" else c["target_met"])

    best = "fitted"
    if held(picks["matcher_only"]) and (not held(picks["fitted"]) or picks["matcher_only"]["recall"] > picks["fitted"]["recall"]):
        best = "matcher_only"
    record = {"chosen": best, "forced": False, "candidates": {k: {"combiner": candidates[k], **{f: v.get(f) for f in (
        "threshold", "precision", "precision_low", "recall", "target_met", "margin_met")}} for k, v in picks.items()}}
    return dict(candidates[best]), record


def choose_crop(brands: list[str], match: dict[str, MatchScores], crop: dict[str, MatchScores], y_val: list[str],
                target_precision: float, rule: str) -> tuple[dict[str, MatchScores] | None, dict[str, Any]]:
    """(the matcher's scores with the crop net folded in, or None; record): kept only when that
    keeps more val recall at the threshold `rule` picks than the matcher alone, with the margin held.

    The merge (`cropnet.merge_local`) scales each signal by its own val threshold under `rule`.
    """
    from pipeline.detector.cropnet import merge_local

    val_logo = np.array([y != NO_LOGO for y in y_val])
    mat_m, mat_c = score_matrix(brands, match["val"]), score_matrix(brands, crop["val"])
    pick_m = threshold_for_precision(val_logo, mat_m.max(axis=1), target_precision, rule=rule)
    pick_c = threshold_for_precision(val_logo, mat_c.max(axis=1), target_precision, rule=rule)
    params = {"kind": "max_scaled", "tm": max(1e-6, float(pick_m["threshold"])), "tc": max(1e-6, float(pick_c["threshold"]))}
    merged = {split: [merge_local(m, c, params) for m, c in zip(match[split], crop[split], strict=True)]
              for split in match}
    pick_f = threshold_for_precision(val_logo, score_matrix(brands, merged["val"]).max(axis=1), target_precision, rule=rule)

    def held(c: dict[str, Any]) -> bool:
        return bool(c.get("margin_met", c["target_met"]) if rule == "wilson" else c["target_met"])

    keep = held(pick_f) and (not held(pick_m) or pick_f["recall"] > pick_m["recall"])
    bound = "its 95% lower bound of" if rule == "wilson" else "its"
    if keep:
        reason = f"kept: folded in, val recall {pick_f['recall']:.3f} against {pick_m['recall']:.3f} for the matcher alone"
    elif not held(pick_f):
        reason = (f"not used: folded in, {bound} val precision does not reach the target {target_precision:g} "
                  f"({len(y_val)} val photos; more val photos or `--threshold-rule point` show it)")
    else:
        reason = (f"not used: folded in, val recall {pick_f['recall']:.3f} is not above the matcher alone's "
                  f"{pick_m['recall']:.3f}")
    fields = ("threshold", "precision", "precision_low", "recall", "target_met", "margin_met")
    record = {"chosen": "matcher+crop" if keep else "matcher", "reason": reason, "params": params,
              "candidates": {name: {f: p.get(f) for f in fields}
                             for name, p in (("matcher", pick_m), ("crop", pick_c), ("matcher+crop", pick_f))}}
    return (merged if keep else None), record


def calibrate(
    probs: dict[str, np.ndarray], classes: list[str], y_val: list[str], target_precision: float,
    matcher_inputs: tuple[list[tuple[str, np.ndarray]], dict[str, list[np.ndarray]], int] | None = None,
    progress: Progress | None = None, rule: str = "wilson", fusion: str = "val", crop_net: Any | None = None,
) -> Calibration:
    """Stage 3: matcher and fusion (when `matcher_inputs` = refs, native crops, workers), thresholds.

    `probs` holds the classifier's val/test softmax; nothing of the test split is used to choose.
    `rule`: how each threshold is picked (`choose_thresholds`); `fusion`: `val` chooses between
    the fitted fusion and the matcher alone on val (`choose_fusion`), `fitted` keeps the fitted one.
    `crop_net` (with a matcher): scored on val/test and folded into the matcher's scores when
    that wins on val (`choose_crop`); the model then carries it.
    """
    if rule not in THRESHOLD_RULES:
        raise DataError(f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, not {shown(rule)}")
    if fusion not in FUSION_CHOICES:
        raise DataError(f"fusion must be one of {', '.join(FUSION_CHOICES)}, not {shown(fusion)}")
    brands = [c for c in classes if c != NO_LOGO]
    matcher, combiner, record = None, None, None
    match: dict[str, MatchScores | None] = {"val": None, "test": None}
    crop: dict[str, MatchScores | None] = {"val": None, "test": None}
    kept_crop, crop_record = None, None
    if matcher_inputs is not None:
        refs, native, workers = matcher_inputs
        matcher, scored, combiner = fit_matcher(refs, native, probs["val"], classes, y_val, workers, progress)
        if crop_net is not None and len(y_val):
            crop = {split: crop_net.score_many(native[split]) for split in ("val", "test")}
            merged, crop_record = choose_crop(brands, scored, crop, y_val, target_precision, rule)
            cands = crop_record["candidates"]
            say(progress, f"crop net: val recall at the operating point {cands['crop']['recall']:.3f} alone, "
                f"{cands['matcher+crop']['recall']:.3f} folded into the matcher (matcher alone "
                f"{cands['matcher']['recall']:.3f}); {crop_record['reason']}", level=logging.WARNING if merged is None else logging.INFO)
            if merged is not None:
                from pipeline.detector.matching import DEFAULT_COMBINER, fit_combiner

                scored, kept_crop = merged, crop_net
                val_cnn = [{c: float(p) for c, p in zip(classes, row, strict=True)} for row in probs["val"]]
                try:
                    combiner = fit_combiner(val_cnn, [{c: s for c, (s, _b) in m.items()} for m in scored["val"]], y_val)
                except ValueError:
                    combiner = dict(DEFAULT_COMBINER)
        match.update(scored)
        if fusion == "val" and len(y_val):
            combiner, record = choose_fusion(brands, probs["val"], classes, scored["val"], combiner, y_val,
                                             target_precision, rule)
            if record["chosen"] == "matcher_only":
                say(progress, "fusion: the matcher alone keeps more validation recall at the operating point "
                    f"({record['candidates']['matcher_only']['recall']:.3f} vs {record['candidates']['fitted']['recall']:.3f} "
                    "fused with the CNN); deciding with it")
        elif fusion == "fitted":  # recorded like a choice, so the metrics say which fusion decides either way
            record = {"chosen": "fitted", "forced": True, "reason": "fusion: fitted was asked for; not chosen on val",
                      "combiner": dict(combiner)}
    signals = {split: signal_matrices(brands, probs[split], classes, match[split], combiner, crop[split])
               for split in ("val", "test")}
    thresholds = choose_thresholds(signals["val"], y_val, target_precision, rule)
    main = "fused" if "fused" in signals["test"] else "cnn"
    chosen = thresholds[main]
    if not chosen.get("target_met"):
        say(progress, f"warning: no threshold reaches precision {target_precision} on the validation split; "
            f"using the best-F1 threshold {float(chosen['threshold']):.3f}")
    elif rule == "wilson" and not chosen.get("margin_met"):
        say(progress, f"the validation split is too small to show precision {target_precision} with 95% "
            f"confidence (best lower bound {chosen['precision_low']:.3f} at {chosen['tp']}/{chosen['called']}); "
            f"threshold {float(chosen['threshold']):.3f} may fall below the target on new photos", level=logging.WARNING)
    if crop_record is not None:
        record = {**(record or {}), "crop": crop_record}
    return Calibration(matcher=matcher, combiner=combiner, thresholds=thresholds, signals=signals, main=main,
                       fusion=record, crop_net=kept_crop, crop=crop_record["params"] if kept_crop is not None else None)
