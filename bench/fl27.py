"""The FlickrLogos-27 quality target, end to end with the shipped defaults.

Runs exactly what a user runs, in a throwaway home (SQLite + local lake):

    brandmon train --data $BRANDMON_FL27_DIR --format boxes      (default settings)
    brandmon evaluate --data <home>/eval/<version> --json           (the held-out test photos)

and prints the wall time, the base weights used, and logo precision/recall/F1 + brand top-1
for each signal alone (CNN, matcher) and fused, with 95% Wilson intervals and their counts for
the deciding signal. How the threshold holds on new photos: bench/operating_point.py --home. The split is the content-hash split; the
thresholds and the fusion come from the validation split; the test photos are only scored.
Baseline in the same run: a chance detector (always "logo", uniformly random brand).

    BRANDMON_FL27_DIR=../shared/datasets/flickr_logos_27 nice -n 5 .venv/bin/python bench/fl27.py

Exit status 1 when the issue's floor (logo precision >= 0.77 and recall >= 0.40) is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLOOR = {"precision": 0.77, "recall": 0.40}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("BRANDMON_FL27_DIR"))
    ap.add_argument("--home", help="keep the run here instead of a temporary folder")
    args = ap.parse_args(argv)
    if not args.data or not Path(args.data, "annotations.txt").is_file():
        print("FlickrLogos-27 not found: set BRANDMON_FL27_DIR or pass --data", file=sys.stderr)
        return 2

    from pipeline.context import Context
    from pipeline.database import upgrade
    from pipeline.detector.evaluate import evaluate_folder, format_report
    from pipeline.detector.jobs import train_model
    from pipeline.progress import terminal
    from pipeline.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="brandmon-fl27-") as tmp:
        root = Path(args.home or tmp)
        root.mkdir(parents=True, exist_ok=True)
        env = {
            "BRANDMON_HOME": str(root / "var"),
            "BRANDMON_DATABASE_URL": f"sqlite:///{root / 'fl27.db'}",
            "BRANDMON_STORAGE_URL": (root / "lake").as_uri(),
            "BRANDMON_AUTHOR_SALT": "bench",
        }
        ctx = Context(load_settings(env=env))
        upgrade(ctx.engine)
        started = time.monotonic()
        result = train_model(ctx, args.data, fmt="boxes", activate="always", progress=terminal)
        train_s = time.monotonic() - started
        started = time.monotonic()
        report = evaluate_folder(ctx, result["eval_dir"], version=result["version"], progress=terminal)
        eval_s = time.monotonic() - started

        params = result["params"]
        labels = report["n_logo"], report["n_images"]
        n_brands = len([c for c in report["per_class"] if c != "no_logo"]) or 27
        print(f"FlickrLogos-27, default training: {train_s / 60:.1f} min wall (stages, s: {params['stage_seconds']})")
        print(f"base weights: {ctx_weights(ctx, result['version'])} ({params.get('weights_note') or 'as requested'}); "
              f"input {params['config']['input_size']}px, mode {params['config']['mode']}, history {params['history']}")
        print(f"splits (samples): {params['splits']}; matcher references: {(params['matcher'] or {}).get('references')}")
        print(f"brandmon evaluate on the held-out test split ({labels[1]} images, {labels[0]} with a brand), "
              f"{eval_s:.0f}s:")
        print(format_report(report))
        print(f"  chance   logo P {labels[0] / max(1, labels[1]):.3f}  R 1.000  brand top-1 {1 / n_brands:.3f}")
        main_sig = report["signals"][report["signal"]]
        ok = main_sig["logo"]["precision"] >= FLOOR["precision"] and main_sig["logo"]["recall"] >= FLOOR["recall"]
        print(f"target (logo P >= {FLOOR['precision']}, R >= {FLOOR['recall']}) on signal {report['signal']}: "
              f"{'MET' if ok else 'MISSED'}")
        print(json.dumps({"train_s": round(train_s, 1), "eval_s": round(eval_s, 1), "signals": report["signals"],
                          "n_images": report["n_images"], "n_logo": report["n_logo"], "intervals": report["intervals"],
                          "interval_method": report["interval_method"], "fusion": result["metrics"].get("fusion"),
                          "thresholds": result["metrics"]["thresholds"]}, indent=1))
        ctx.close()
    return 0 if ok else 1


def ctx_weights(ctx, version: str) -> str:
    from pipeline.detector.registry import get_version

    return str(get_version(ctx, version)["weights"])


if __name__ == "__main__":
    raise SystemExit(main())
