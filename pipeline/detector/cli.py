"""`brandmon train | evaluate | detect | model | review`: the detector's commands.

No TensorFlow import here: handlers import the heavy modules when they run, so `brandmon
--help` and other commands stay fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.errors import cut, shown
from pipeline.progress import for_cli

# the choices of TrainConfig.model (threshold_rule, fusion, crop_net, matcher), kept here so `--help` needs no import of the
# training stages (a test keeps them equal)
THRESHOLD_RULES = ("wilson", "point")
FUSION_CHOICES = ("val", "fitted")
CROP_NET_CHOICES = ("auto", "off")
MATCHER_CHOICES = ("auto", "on", "off")
MAX_BUDGET_S = 30 * 86400  # --time-budget and --crop-net-budget: up to 30 days
CASCADE_COST_NOTE = 1.5  # the export notes a cascade whose network time is this many times int8 alone's
RUNTIMES = ["auto", "keras", "openvino", "onnx", "tflite", "savedmodel"]


def _ctx() -> Any:
    from pipeline.context import open_context

    return open_context()


def _count(text: str) -> int:
    """A `--limit`: a whole number, 0 or more (a negative LIMIT is all rows on SQLite, an error on Postgres)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {shown(text)}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


MIN_INPUT, MAX_INPUT = 32, 1024  # px; 100,000 px asked for a 28 GiB array (MemoryError)


def _bounded(kind: type, low: float, high: float) -> Any:
    """An argparse type: a finite `kind` from `low` to `high` (the train DAG's param bounds)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if kind is int else ''}number: {shown(text)}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be from {low:g} to {high:g}, got {cut(text)}")
        return value

    return parse


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=False, default=str))


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.detector.jobs import train_model

    options: dict[str, Any] = {}
    if args.input_size:
        options["input_size"] = args.input_size
    if args.mode:
        options["mode"] = args.mode
    if args.fine_tune:
        options["mode"] = f"finetune:{args.fine_tune}"
    if args.augment is not None:
        options["augment"] = args.augment
    if args.flip:
        options["augment_flip"] = True
    if args.no_upsample:
        options["upsample"] = 0.0
    if args.class_weights:
        options["class_weights"] = True
    if args.matcher:
        options["matcher"] = args.matcher
    if args.time_budget is not None:
        options["time_budget_s"] = args.time_budget
    if args.threshold_rule:
        options["threshold_rule"] = args.threshold_rule
    if args.fusion:
        options["fusion"] = args.fusion
    if args.crop_net:
        options["crop_net"] = args.crop_net
    if args.crop_net_budget is not None:
        options["crop_net_budget_s"] = args.crop_net_budget
    ctx = _ctx()
    result = train_model(
        ctx, args.data, fmt=args.format, weights=args.weights, epochs=args.epochs,
        target_precision=args.target_precision, profile=args.profile, activate=args.activate,
        progress=for_cli(args.quiet), **options,
    )
    if args.json:
        _print_json({k: result.get(k) for k in ("version", "activated", "promotion", "metrics", "pr_curve", "eval_dir")})
    else:
        m = result["metrics"]
        print(f"model {result['version']}{' (active)' if result['activated'] else ''}: held-out test split "
              f"({m['n_test']} images, signal {m['signal']}): logo precision {m['precision']:.3f}, "
              f"recall {m['recall']:.3f}, brand top-1 {m['brand_accuracy']:.3f}")
        for name, s in m["per_signal_test"].items():
            print(f"  {name:8s} P {s['logo']['precision']:.3f}  R {s['logo']['recall']:.3f}  "
                  f"top-1 {s['brand_accuracy']:.3f}")
        if m.get("intervals"):
            from pipeline.detector.evaluate import interval_text

            print(f"  {m['signal']}, 95% Wilson intervals: " + "  ".join(interval_text(k, v) for k, v in m["intervals"].items()))
        training = m.get("training") or {}
        if training.get("cut_by_time_budget"):
            from pipeline.detector.train import budget_cut_message

            print(f"warning: {budget_cut_message(training)}")
        if result.get("promotion"):
            from pipeline.detector.train import promotion_line

            print(promotion_line(result["promotion"]))
        print(f"PR curve: {result['pr_curve']}")
        print(f"held-out split as folders: {result['eval_dir']}  (re-score: brandmon evaluate --data {result['eval_dir']} --model {result['version']})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.detector.evaluate import evaluate_folder, format_report

    report = evaluate_folder(_ctx(), args.data, version=args.model, progress=for_cli(args.quiet), runtime=args.runtime)
    if args.json:
        _print_json(report)
    else:
        print(format_report(report))
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from pipeline.dag_assets import parse_batch_key
    from pipeline.detector.infer import detect
    from pipeline.detector.registry import UnknownModel, active_version

    ctx = _ctx()
    kwargs: dict[str, Any] = {"limit": args.limit, "progress": for_cli(args.quiet), "precision": args.precision,
                              "runtime": args.runtime}
    if args.batch_key:
        version, lo, hi = parse_batch_key(args.batch_key)
        kwargs.update(version=version, lo=lo, hi=hi)
    elif args.model:
        kwargs["version"] = args.model
    elif active_version(ctx) is None:
        raise UnknownModel("no active model; train one (`brandmon train`) or `brandmon model activate V`")
    counts = detect(ctx, **kwargs)
    if args.json:
        _print_json(counts)
    else:
        print(", ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


def _figure(value: object) -> str:
    """A stored figure for the table, `n/a` when it is missing or not a number (a hand-edited row)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:>6.3f}"
    return f"{'n/a':>6}"


def cmd_model_list(args: argparse.Namespace) -> int:
    from pipeline.detector.registry import list_versions

    rows = list_versions(_ctx())
    if args.json:
        _print_json([
            {k: r[k] for k in ("version", "active", "created_at", "classes", "base", "weights", "input_size", "threshold", "artifact_key")}
            | {"precision": (r["metrics"] or {}).get("precision"), "recall": (r["metrics"] or {}).get("recall")}
            for r in rows
        ])
        return 0
    if not rows:
        print("no models yet; train one with `brandmon train --data DIR`")
        return 0
    print(f"{'':2}{'version':8} {'created (UTC)':17} {'classes':>7} {'weights':10} {'input':>5} {'thr':>6} {'P':>6} {'R':>6}  signal")
    for r in rows:
        m = r["metrics"] or {}
        weights = r["weights"] if len(r["weights"]) <= 10 else r["weights"][:10]
        print(f"{'*' if r['active'] else ' ':2}{r['version']:8} {r['created_at']:%Y-%m-%d %H:%M} {len(r['classes']):>7} "
              f"{weights:10} {r['input_size']:>5} {r['threshold']:>6.3f} {_figure(m.get('precision'))} "
              f"{_figure(m.get('recall'))}  {m.get('signal', '') if isinstance(m.get('signal'), str) else ''}")
    print("(* = active; P/R = logo precision/recall on the held-out test split)")
    return 0


def cmd_model_activate(args: argparse.Namespace) -> int:
    from pipeline.detector.registry import activate

    ctx = _ctx()
    activate(ctx, args.version)
    print(f"model {args.version} is now active; `brandmon detect` scores images it has not scored yet")
    return _emit_model_event(ctx.settings, args.version)


def _emit_model_event(settings: Any, version: str) -> int:
    """Tell Airflow (when BRANDMON_AIRFLOW_API_URL is set): the brandmon://model asset event
    schedules brandmon_detect to score the images with the new model now."""
    from pipeline.airflow_api import AirflowApiError, emit_asset_event
    from pipeline.dag_assets import MODEL

    fallback = "`airflow dags trigger brandmon_detect` starts the scoring by hand"
    if not settings.airflow_api_url:
        print(f"(on Airflow: set BRANDMON_AIRFLOW_API_URL to emit the {MODEL} event, or {fallback})")
        return 0
    try:
        event = emit_asset_event(settings.airflow_api_url, settings.airflow_api_user,
                                 settings.airflow_api_password.get(), MODEL,
                                 {"version": version, "source": "brandmon model activate"})
    except AirflowApiError as exc:
        raise AirflowApiError(f"model {version} is active, but the {MODEL} event was not sent: {exc} "
                              f"(or {fallback})") from None
    print(f"{MODEL} event {event.get('id', '?')} sent to Airflow: brandmon_detect will score with {version}")
    return 0


def _export_use(fmt: str) -> str:
    """When `detect` scores with an export of `fmt`: `auto` picks by PREFERENCE and never the
    SavedModel (it is for TF Serving-style deployment, no faster than Keras)."""
    from pipeline.detector.runtimes import PREFERENCE

    if fmt not in PREFERENCE:
        return f"`brandmon detect --runtime {fmt}` (or detector.runtime: {fmt}) scores with it; auto does not pick it"
    faster = PREFERENCE[: PREFERENCE.index(fmt)]
    unless = f", unless the model also has an {' or '.join(faster)} export" if faster else ""
    return f"`brandmon detect` uses it when its runtime is installed (detector.runtime: auto{unless})"


def cmd_model_export(args: argparse.Namespace) -> int:
    from pipeline.detector.export import CALIBRATION_IMAGES, export_model

    meta = export_model(_ctx(), args.version, args.format, precision=args.precision, calibration=args.calibration,
                        calibration_images=args.calibration_images, rescore=args.rescore or "auto")
    if args.rescore and not (meta["format"] == "openvino" and meta["precision"] == "int8"):
        print(f"note: --rescore applies to OpenVINO int8 exports only; ignored for {meta['format']} "
              f"{meta['precision']}", file=sys.stderr)
    if meta["precision"] != "int8" and (args.calibration or args.calibration_images != CALIBRATION_IMAGES):
        print(f"note: --calibration and --calibration-images apply to int8 exports only; ignored for "
              f"{meta['format']} {meta['precision']}", file=sys.stderr)
    if args.json:
        _print_json(meta)
    else:
        n = meta["calibration_images"]
        calib = f", calibrated on {n} image{'s' if n != 1 else ''}" if n else ""
        print(f"model {args.version} exported as {meta['format']} ({meta['precision']}, {meta['runtime']}{calib}): "
              f"{meta['key']} ({meta['bytes'] / 1e6:.1f} MB, {meta['seconds']}s); {_export_use(meta['format'])}")
        if "rescore_margin" in meta:
            c = meta["rescore_check"]
            print(f"precision cascade: photos whose int8 top-two margin is at or below {meta['rescore_margin']:.4f} are "
                  f"scored again in {c['rescore_precision']}; on {meta['rescore_check_images']} "
                  f"{'training' if not args.calibration else 'calibration-folder'} images it re-scored "
                  f"{100 * c['rescored_share']:.1f}% and kept {100 * c['cascade_top_class_agreement']:.1f}% of the fp32 "
                  f"top classes (int8 alone {100 * c['int8_top_class_agreement']:.1f}%; --rescore off: int8 alone)")
            note = cascade_cost_note(c)
            if note:
                print(note)
    return 0


def cascade_cost_note(check: dict[str, Any]) -> str | None:
    """A line for an export whose cascade re-scores so many photos that its network time is
    `CASCADE_COST_NOTE` times int8 alone's or more (None below): the speed is the user's trade."""
    cost = check.get("network_time_vs_int8")
    if isinstance(cost, bool) or not isinstance(cost, int | float) or not cost >= CASCADE_COST_NOTE:  # NaN: no
        return None
    return (f"note: re-scoring that share makes the cascade's network time {cost:.1f}x int8 alone's (measured on "
            f"those images); --rescore off trades it for int8 alone's {100 * check['int8_top_class_agreement']:.1f}% "
            "top-class agreement")


def cmd_review_export(args: argparse.Namespace) -> int:
    from pipeline.detector.review import export_queue

    result = export_queue(_ctx(), args.out, limit=args.limit)
    print(f"{result['queued']} queued images in {result['out']} ({result['written']} new files); "
          f"label them (manifest.csv `label` column, or move into class folders), then "
          f"`brandmon review import {result['out']}`")
    return 0


def cmd_review_import(args: argparse.Namespace) -> int:
    from pipeline.detector.review import import_labels

    result = import_labels(_ctx(), args.dir, into=args.into)
    print(f"{result['labelled']} labelled ({result['copied']} new files), {result['unlabelled']} still unlabelled; "
          f"training data in {result['training_dir']} (brandmon train --data {result['training_dir']})")
    for r in result["refused"]:
        print(f"refused row {r['sha256'][:12]}: {r['reason']}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    """Add the detector's sub-commands to the `brandmon` parser."""
    _add_train(sub)
    _add_evaluate(sub)
    _add_detect(sub)
    _add_model(sub)
    _add_review(sub)


def _add_train(sub: Any) -> None:
    t = sub.add_parser(
        "train", help="train a logo model (Inception v3 + local-feature matcher) and register it",
        description=(
            "Train on a folders layout (one sub-folder per class, no_logo/ for images without a brand) or "
            "box annotations (per-image JSON or FlickrLogos-27 text). The split comes from each image's "
            "content hash; thresholds are chosen on the validation split; the held-out test split is "
            "reported, plotted (PR curve PNG) and written as folders to <BRANDMON_HOME>/eval/<version>/."
        ),
    )
    t.add_argument("--data", required=True, help="training data folder")
    t.add_argument("--format", choices=["folders", "boxes"], default="folders", help="data layout (default: folders)")
    t.add_argument("--weights", default="auto", help="auto | imagenet | none | PATH to base weights .h5 (default: auto)")
    t.add_argument("--epochs", type=_bounded(int, 1, 500), help="image-training epochs (default: per profile/mode)")
    t.add_argument("--target-precision", type=_bounded(float, 0.5, 1.0), default=0.9, help="logo precision the threshold aims for (default 0.9)")
    t.add_argument("--profile", choices=["default", "demo"], default="default")
    t.add_argument("--activate", choices=["if_better", "always", "never"], default="if_better",
                   help="if_better (default): activate only when it beats the active model at the operating point, "
                        "both scored on the new validation split (first: the 95%% Wilson lower bound of precision "
                        "reaching --target-precision, then recall, brand top-1, F1); always; never (register only)")
    t.add_argument("--threshold-rule", choices=THRESHOLD_RULES, metavar="{wilson,point}",
                   help="how each threshold is picked on the validation split: wilson (default) = the lowest whose "
                        "95%% Wilson lower bound of precision reaches --target-precision (holds on new photos); "
                        "point = the measured precision alone reaches it (the old rule: more recall, less sure)")
    t.add_argument("--fusion", choices=FUSION_CHOICES, metavar="{val,fitted}",
                   help="val (default): choose on the validation split between the fitted CNN+matcher fusion and "
                        "the matcher alone, by the recall each keeps at the operating point; fitted: always the "
                        "fitted fusion")
    t.add_argument("--input-size", type=_bounded(int, MIN_INPUT, MAX_INPUT), help="square input side in px (default: 299 pretrained, 128 from scratch)")
    t.add_argument("--mode", choices=["auto", "head", "full"], help="train the head on cached features, or the whole network")
    t.add_argument("--fine-tune", type=int, metavar="N", help="after the head, also train the top N Inception blocks")
    t.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None, help="augmentation (crop, scale, brightness)")
    t.add_argument("--flip", action="store_true", help="add horizontal flips to the augmentation")
    t.add_argument("--no-upsample", action="store_true", help="do not up-sample rare classes")
    t.add_argument("--class-weights", action="store_true", help="also weight the loss by inverse class frequency")
    t.add_argument("--matcher", choices=MATCHER_CHOICES, help="local-feature matcher (default auto: with boxes)")
    t.add_argument("--time-budget", type=_bounded(float, 1, MAX_BUDGET_S), metavar="SECONDS", help="stop image training after this long")
    t.add_argument("--crop-net", choices=CROP_NET_CHOICES, metavar="{auto,off}",
                   help="auto (default): with boxes and a matcher, also train the crop net (a small conv net on the "
                        "box crops) and fold it into the matcher's scores when that keeps more validation recall; "
                        "off: skip it")
    t.add_argument("--crop-net-budget", type=_bounded(float, 1, MAX_BUDGET_S), metavar="SECONDS",
                   help="the crop net's training time, taken out of --time-budget (the classifier keeps at least "
                        "60 s of it) (default: 840 with the default profile, else 420)")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)


def _add_evaluate(sub: Any) -> None:
    e = sub.add_parser("evaluate", help="score a labelled folders layout with a model; P/R/F1 per signal")
    e.add_argument("--data", required=True, help="folders layout (class names case-insensitive, no_logo/)")
    e.add_argument("--model", help="model version (default: the active one)")
    e.add_argument("--runtime", choices=RUNTIMES, help="override detector.runtime (default auto)")
    e.add_argument("--json", action="store_true", help="print the full JSON report")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate)


def _add_detect(sub: Any) -> None:
    d = sub.add_parser("detect", help="score every stored image the active model has not scored yet")
    d.add_argument("--limit", type=_count, help="score at most N images")
    d.add_argument("--batch-key", help="only the images of one key from pending_batches (Airflow)")
    d.add_argument("--model", help="score with this version instead of the active one")
    d.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="override detector.mixed_precision")
    d.add_argument("--runtime", choices=RUNTIMES,
                   help="override detector.runtime: auto = the fastest installed runtime with an export, else keras")
    d.add_argument("--json", action="store_true")
    d.add_argument("--quiet", action="store_true")
    d.set_defaults(func=cmd_detect)


def _add_model(sub: Any) -> None:
    m = sub.add_parser("model", help="the model registry: list versions, activate one")
    msub = m.add_subparsers(dest="model_command", metavar="ACTION", required=True)
    ml = msub.add_parser("list", help="registered versions (* = active)")
    ml.add_argument("--json", action="store_true")
    ml.set_defaults(func=cmd_model_list)
    ma = msub.add_parser("activate", help="make version V the active one")
    ma.add_argument("version")
    ma.set_defaults(func=cmd_model_activate)
    mx = msub.add_parser(
        "export", help="write version V as an OpenVINO / ONNX / TFLite / SavedModel artifact into the lake",
        description=("The classifier (the matcher and fusion stay in Python) for a faster inference runtime; int8 "
                     "post-training quantisation calibrated on the model's training images where the format has it."),
    )
    mx.add_argument("version")
    mx.add_argument("--format", required=True, choices=["openvino", "onnx", "tflite", "savedmodel"])
    mx.add_argument("--precision", choices=["auto", "int8", "fp32"], default="auto",
                    help="auto: int8 for openvino/onnx/tflite, fp32 for savedmodel")
    mx.add_argument("--calibration", metavar="DIR", help="calibration images (default: the model's training split)")
    mx.add_argument("--calibration-images", type=_bounded(int, 8, 4096), default=64, metavar="N",
                    help="calibration images used (default 64, 8 to 4096: they are held in memory)")
    mx.add_argument("--rescore", choices=["auto", "off"],
                    help="openvino int8 only: auto (default) = also store the fp32 network and score again in fp32 the "
                         "photos whose int8 top two classes are close (margin chosen on up to 256 further images of the "
                         "calibration source), so >= 99%% of fp32 top classes hold; off = int8 alone")
    mx.add_argument("--json", action="store_true")
    mx.set_defaults(func=cmd_model_export)


def _add_review(sub: Any) -> None:
    r = sub.add_parser("review", help="near-threshold images: export for labelling, import labels as training data")
    rsub = r.add_subparsers(dest="review_command", metavar="ACTION", required=True)
    rx = rsub.add_parser("export", help="write queued images + manifest.csv to a folder")
    rx.add_argument("--out", required=True)
    rx.add_argument("--limit", type=_count, help="export at most N queued images")
    rx.set_defaults(func=cmd_review_export)
    ri = rsub.add_parser("import", help="read labels back; copy images into a folders training layout")
    ri.add_argument("dir")
    ri.add_argument("--into", help="training folder to add to (default: <BRANDMON_HOME>/training/review)")
    ri.set_defaults(func=cmd_review_import)
