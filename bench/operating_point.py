"""Does the operating point hold on new photos?  Old threshold rule against the new, resampled.

The threshold of a trained model is picked on its validation split (181 FL27 photos); the
outside check of issue #14 saw precision fall from 0.92 to 0.85 on photos the model never saw.
This bench simulates "new photos of the same kind" with the saved per-photo scores of one
trained model: `--draws` times, the pooled val+test photos are cut into two random halves; a
rule picks the threshold on one half (it plays the validation split) and precision/recall are
measured on the other half (the new photos). Per rule it prints the out-of-sample precision's
mean, 5th percentile and share of draws below the floor, and the recall it costs.

Rules (pipeline.detector.metrics.threshold_for_precision), each per signal (cnn, matcher, fused):
- `point`  -- the old default: the lowest threshold whose validation precision >= target;
- `wilson` -- the new default: the lowest threshold whose Wilson score lower bound (95%
  two-sided) of validation precision >= target, i.e. a margin that shrinks as the split grows;
  also at 90% / 80% confidence, and `point` with a fixed margin (target 0.95), for comparison;
- `best`   -- the fitted fusion or the matcher alone, whichever keeps more recall on the picking
  half under the rule: what `brandmon train` now does by default (`fusion: val`,
  `calibrate.choose_fusion`; the matcher alone is the fused signal with the CNN weighted 0).
Baseline in the same run: the old rule.

Scores: fusion and matcher weights are the stored model's; per-photo scores of its val and test
splits are re-computed once from the data (the split is the content hash of each photo, the
samples are the training run's own) and cached in `<home>/var/models/<version>/scores.npz`
(training now writes that file itself; the stored figures are checked against it).

    BRANDMON_FL27_DIR=/work/shared/datasets/flickr_logos_27 nice -n 5 .venv/bin/python \
        bench/operating_point.py --home /tmp/b13bench/fl27home
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLOOR = 0.90


def context(home: Path) -> Any:
    from pipeline.context import Context
    from pipeline.settings import load_settings

    env = {
        "BRANDMON_HOME": str(home / "var"),
        "BRANDMON_DATABASE_URL": f"sqlite:///{home / 'fl27.db'}",
        "BRANDMON_STORAGE_URL": (home / "lake").as_uri(),
        "BRANDMON_AUTHOR_SALT": "bench",
    }
    return Context(load_settings(env=env))


def rescore(ctx: Any, version: str, data: str) -> dict[str, Any]:
    """The model's val/test per-signal scores, on the very samples its training run cut."""
    from pipeline.detector.data import load_sources
    from pipeline.detector.registry import get_version, load_model
    from pipeline.detector.split import split_of
    from pipeline.detector.training.calibrate import signal_matrices
    from pipeline.detector.training.config import resolve_config
    from pipeline.detector.training.prepare import prepare
    from pipeline.progress import terminal

    row = get_version(ctx, version)
    stored = dict(row["params"]["config"])
    cfg = resolve_config("default", row["weights"] != "none", None, stored)
    sources = [s for s in load_sources(data, "boxes") if split_of(s.sha256, cfg.data.fractions) in ("val", "test")]
    prep = prepare(sources, cfg, terminal, want_refs=False)
    model = load_model(ctx, version, runtime="keras")
    spec = model.spec
    out: dict[str, Any] = {"brands": np.array(spec.brands)}
    for split in ("val", "test"):
        px = prep.pixels[split]
        probs = np.concatenate([model.predict_arrays(px[i : i + 32]) for i in range(0, len(px), 32)])
        match = model.matcher.score_many(prep.native[split], workers=2, progress=terminal) if model.matcher else None
        for name, mat in signal_matrices(spec.brands, probs, spec.classes, match, spec.combiner).items():
            out[f"{split}/{name}"] = mat
        out[f"{split}/labels"] = np.array([s.label for s in prep.samples[split]])
    return out


def load_scores(home: Path, version: str, data: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores, registry row): from the model's scores.npz, else re-scored and cached there."""
    from pipeline.detector.registry import get_version
    from pipeline.detector.training.report import SCORES_FILE

    ctx = context(home)
    row = get_version(ctx, version)
    path = home / "var" / "models" / version / SCORES_FILE
    if not path.is_file():
        if not data:
            raise SystemExit(f"{path} is missing: pass --data (FlickrLogos-27) to re-score val/test once")
        scores = rescore(ctx, version, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **scores)
    with np.load(path, allow_pickle=False) as z:
        scores = {k: z[k] for k in z.files}
    ctx.close()
    return scores, row


def check_against_registry(scores: dict[str, Any], row: dict[str, Any]) -> list[str]:
    """The stored val/test figures re-computed from the scores: the scores are the model's own."""
    from pipeline.detector.metrics import evaluate_scores

    lines, metrics = [], row["metrics"]
    brands = [str(b) for b in scores["brands"]]
    for name, t in metrics["thresholds"].items():
        for split, ref in (("val", metrics["val"][name]), ("test", metrics["per_signal_test"][name])):
            if f"{split}/{name}" not in scores:
                continue
            m = evaluate_scores([str(y) for y in scores[f"{split}/labels"]], scores[f"{split}/{name}"], brands, t["threshold"])
            lines.append(f"  {split:4s} {name:8s} at {t['threshold']:.3f}: P {m['logo']['precision']:.3f} "
                         f"R {m['logo']['recall']:.3f} (registry: P {ref['logo']['precision']:.3f} R {ref['logo']['recall']:.3f})")
    return lines


def measure(hold_logo: np.ndarray, hold_score: np.ndarray, threshold: float) -> tuple[float, float]:
    """(precision, recall) of `score >= threshold` on the held-out half (precision 1 if none called)."""
    called = hold_score >= threshold
    tp = int(np.sum(called & hold_logo))
    fp = int(np.sum(called & ~hold_logo))
    return (tp / (tp + fp) if tp + fp else 1.0), tp / max(1, int(hold_logo.sum()))


def pick(is_logo: np.ndarray, scores: dict[str, np.ndarray], idx: np.ndarray, rule: dict[str, Any],
         target: float) -> tuple[str, dict[str, Any]]:
    """(signal, threshold choice) on the photos `idx`: `rule["signals"]` lists the candidate
    signals; with several, the one with the most recall among those holding the rule's margin,
    the first on a tie or when none holds (as `calibrate.choose_fusion`: fused, then matcher)."""
    from pipeline.detector.metrics import threshold_for_precision

    kw = {k: v for k, v in rule.items() if k in ("rule", "confidence")}
    t = rule.get("target", target)
    choices = {sig: threshold_for_precision(is_logo[idx], scores[sig][idx], t, **kw) for sig in rule["signals"]}
    ok = "margin_met" if kw.get("rule") == "wilson" else "target_met"
    held = [sig for sig, c in choices.items() if c[ok]] or list(choices)[:1]
    best = max(held, key=lambda sig: choices[sig]["recall"])
    return best, choices[best]


def simulate(is_logo: np.ndarray, scores: dict[str, np.ndarray], rules: dict[str, dict[str, Any]], target: float,
             draws: int, seed: int) -> dict[str, dict[str, Any]]:
    """Per rule: out-of-sample precision/recall over `draws` random half-splits (pick | measure).

    Every rule sees the same draws (one generator, permutations drawn once per draw)."""
    rng = np.random.default_rng(seed)
    n = len(is_logo)
    got: dict[str, dict[str, list[Any]]] = {r: {"p": [], "r": [], "thr": [], "sig": []} for r in rules}
    for _ in range(draws):
        perm = rng.permutation(n)
        half, hold = perm[: n // 2], perm[n // 2 :]
        for name, rule in rules.items():
            sig, choice = pick(is_logo, scores, half, rule, target)
            p, r = measure(is_logo[hold], scores[sig][hold], choice["threshold"])
            got[name]["p"].append(p)
            got[name]["r"].append(r)
            got[name]["thr"].append(choice["threshold"])
            got[name]["sig"].append(sig)
    out = {}
    for name, g in got.items():
        p, r = np.array(g["p"]), np.array(g["r"])
        sigs = {s: g["sig"].count(s) for s in sorted(set(g["sig"]))}
        out[name] = {"precision_mean": float(p.mean()), "precision_p5": float(np.percentile(p, 5)),
                     "share_below_floor": float(np.mean(p < FLOOR)), "recall_mean": float(r.mean()),
                     "recall_p5": float(np.percentile(r, 5)), "threshold_median": float(np.median(g["thr"])),
                     "signals": sigs}
    return out


RULES = {  # name -> how to pick: threshold_for_precision's rule/confidence, target override, signals
    "point (old)": {"rule": "point"},
    "wilson 95% (new)": {"rule": "wilson"},
    "wilson 90%": {"rule": "wilson", "confidence": 0.90},
    "wilson 80%": {"rule": "wilson", "confidence": 0.80},
    "point, target 0.95": {"rule": "point", "target": 0.95},
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a bench/fl27.py --home folder")
    ap.add_argument("--version", default="v1")
    ap.add_argument("--data", default=os.environ.get("BRANDMON_FL27_DIR"))
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--seed", type=int, default=14)
    ap.add_argument("--target", type=float, default=0.90)
    args = ap.parse_args(argv)

    from pipeline.detector.metrics import evaluate_scores

    started = time.monotonic()
    scores, row = load_scores(args.home, args.version, args.data)
    brands = [str(b) for b in scores["brands"]]
    print(f"model {args.version} of {args.home} ({row['weights']} weights); target precision {args.target}, "
          f"floor {FLOOR}; {args.draws} random half-splits, seed {args.seed}")
    print("scores re-computed against the registry's figures:")
    print("\n".join(check_against_registry(scores, row)))

    doc: dict[str, Any] = {}
    signals = [k.split("/", 1)[1] for k in scores if k.startswith("test/") and k != "test/labels"]
    for pool_name, splits in (("val+test", ("val", "test")), ("test only", ("test",))):
        labels = np.concatenate([scores[f"{s}/labels"] for s in splits])
        is_logo = labels != "no_logo"
        logo_score = {sig: np.concatenate([scores[f"{s}/{sig}"] for s in splits]).max(axis=1) for sig in signals}
        print(f"\npool {pool_name}: {len(labels)} photos ({int(is_logo.sum())} with a logo), halves of {len(labels) // 2}; "
              "pick on one half, measure on the other")
        print(f"  {'signal':8s} {'rule':20s} {'P mean':>7s} {'P 5th%':>7s} {'P<0.90':>7s} {'R mean':>7s} "
              f"{'R 5th%':>7s} {'thr med':>8s}")
        rules = {f"{sig}|{r}": {**kw, "signals": [sig]} for sig in signals for r, kw in RULES.items()}
        if {"matcher", "fused"} <= set(signals):
            for r in ("point (old)", "wilson 95% (new)"):
                rules[f"best|{r}"] = {**RULES[r], "signals": ["fused", "matcher"]}
        res = simulate(is_logo, logo_score, rules, args.target, args.draws, args.seed)
        for key, r in res.items():
            sig, rule = key.split("|")
            doc[f"{pool_name}/{sig}/{rule}"] = r
            extra = f"  picked: {r['signals']}" if sig == "best" else ""
            print(f"  {sig:8s} {rule:20s} {r['precision_mean']:7.3f} {r['precision_p5']:7.3f} "
                  f"{r['share_below_floor']:7.1%} {r['recall_mean']:7.3f} {r['recall_p5']:7.3f} "
                  f"{r['threshold_median']:8.3f}{extra}")

    print("\nwhole splits (pick on val, report test), with 95% Wilson intervals [counts]:")
    y_test = [str(y) for y in scores["test/labels"]]
    val_logo = scores["val/labels"] != "no_logo"
    val_score = {sig: scores[f"val/{sig}"].max(axis=1) for sig in signals}
    every = np.arange(len(val_logo))
    cases = [(sig, rule, [sig]) for sig in signals for rule in ("point (old)", "wilson 95% (new)")]
    if {"matcher", "fused"} <= set(signals):
        cases += [("best", rule, ["fused", "matcher"]) for rule in ("point (old)", "wilson 95% (new)")]
    for name, rule, cands in cases:
        sig, choice = pick(val_logo, val_score, every, {**RULES[rule], "signals": cands}, args.target)
        m = evaluate_scores(y_test, scores[f"test/{sig}"], brands, choice["threshold"])
        iv = m["intervals"]
        print(f"  {name:8s} {rule:17s} {sig:8s} thr {choice['threshold']:.3f} (val P {choice['precision']:.3f}, low "
              f"{choice['precision_low']:.3f}, R {choice['recall']:.3f}): test " + "  ".join(
                  f"{k} {v['estimate']:.3f} [{v['low']:.3f}, {v['high']:.3f}] ({v['k']}/{v['n']})" for k, v in iv.items()))
        doc[f"whole/{name}/{rule}"] = {"signal": sig, "threshold": choice["threshold"], "test": iv}
    print(f"\nseconds: {time.monotonic() - started:.0f}; load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(json.dumps(doc, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
