"""Training: data -> samples -> Inception v3 classifier (+ local-feature matcher) -> registry.

`train` runs the stages of `pipeline.detector.training` in order -- prepare the data, fit the
classifier (head | full | finetune), calibrate (matcher, fusion, thresholds) on the validation
split, evaluate on the held-out test split -- then registers the version and maybe activates
it. The split of every photo comes from its content hash (`split.py`); the test split is only
ever *reported*, and written out as a `folders` layout under `<home>/eval/<version>/` so
`brandmon evaluate` can re-score it later.
"""

from __future__ import annotations

import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline.context import Context
from pipeline.detector.data import DataError, fingerprint
from pipeline.detector.training.calibrate import Calibration, calibrate
from pipeline.detector.training.config import TrainConfig, resolve_config
from pipeline.detector.training.fit import Fitted, fit_classifier
from pipeline.detector.training.narrate import say
from pipeline.detector.training.prepare import TrainingData, matcher_refs, prepare_data
from pipeline.detector.training.report import heldout_metrics, write_reports
from pipeline.errors import BrandmonError, shown
from pipeline.progress import Progress

log = logging.getLogger(__name__)

ACTIVATE_POLICIES = ("if_better", "always", "never")


class StageClock:
    """Seconds per stage of one run (`params.stage_seconds`), and the run's total."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.seconds[name] = round(self.seconds.get(name, 0.0) + now - self._last, 1)
        self._last = now

    def total(self) -> float:
        return round(time.monotonic() - self.started, 1)


def setup_run(ctx: Context, profile: str, weights: str, epochs: int | None,
              overrides: dict[str, Any]) -> tuple[TrainConfig, tuple[str, Any, str | None], Path]:
    """Threads, base weights, the resolved config, determinism and the TensorBoard folder."""
    from pipeline.detector.model import configure_threads, enable_determinism, resolve_weights

    threads = ctx.settings.detector.threads
    configure_threads(threads)
    tag, wpath, note = resolve_weights("none" if profile == "demo" and weights == "auto" else weights)
    if note:
        log.info("note: %s", note)
        print(f"note: {note}", file=sys.stderr, flush=True)
    cfg = resolve_config(profile, tag != "none", epochs, overrides)
    if cfg.runtime.deterministic:
        enable_determinism(cfg.runtime.seed)
        if threads <= 0:
            log.warning("deterministic training on all cores (detector.threads=0): the model depends on this "
                        "machine's core count; set detector.threads (or BRANDMON_TF_THREADS) to pin it")
    run_stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    tb_root = Path(ctx.settings.home) / "tensorboard" / f"{run_stamp}-{uuid.uuid4().hex[:6]}"
    return cfg, (tag, wpath, note), tb_root


def train(
    ctx: Context,
    data: str | Path,
    *,
    fmt: str = "folders",
    weights: str = "auto",
    epochs: int | None = None,
    target_precision: float = 0.9,
    profile: str = "default",
    activate: str = "if_better",
    progress: Progress | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train, evaluate on held-out data, register (and maybe activate) a model version."""
    from pipeline.runlog import recorded_run

    if activate not in ACTIVATE_POLICIES:
        raise DataError(f"activate must be if_better, always or never, not {shown(activate)}")
    clock = StageClock()
    cfg, (tag, wpath, note), tb_root = setup_run(ctx, profile, weights, epochs, overrides)
    with recorded_run(ctx.engine, "train", source=str(data)[:128]) as counts:
        prepared = prepare_data(data, fmt, cfg, progress, weights_tag=tag)
        clock.lap("prepare")
        crop_skipped = None
        if prepared.want_crop and cfg.fit.time_budget_s:  # the crop net's minutes come out of the run's budget
            budget = cfg.fit.time_budget_s
            crop_s = max(0.0, min(cfg.fit.crop_net_budget_s, budget - 60.0))  # the classifier keeps >= a minute
            cfg = cfg.with_options(time_budget_s=max(1.0, budget - crop_s), crop_net_budget_s=crop_s)
            say(progress, f"time budget: classifier {cfg.fit.time_budget_s:.0f} s, crop net {cfg.fit.crop_net_budget_s:.0f} s")
            if crop_s <= 0:
                crop_skipped = (f"crop net skipped: the time budget of {budget:.0f} s leaves it nothing (the classifier "
                                f"keeps at least 60 s); raise --time-budget above 60 s to train it")
                say(progress, crop_skipped, level=logging.WARNING)
        fitted = fit_classifier(ctx, prepared, cfg, wpath, tb_root, progress)
        clock.lap("train")
        crop_net = None
        if prepared.want_crop and cfg.fit.crop_net_budget_s > 0:
            crop_net = fit_crop_net(prepared, cfg, fitted.history, progress)
            clock.lap("crop_net")
        inputs = (matcher_refs(prepared), prepared.prep.native, cfg.runtime.matcher_workers) if prepared.want_matcher else None
        cal = calibrate(fitted.probs, prepared.classes, prepared.labels("val"), target_precision, inputs, progress,
                        rule=cfg.model.threshold_rule, fusion=cfg.model.fusion, crop_net=crop_net)
        clock.lap("calibrate")
        metrics = heldout_metrics(cal, prepared.brands, prepared.labels("val"), prepared.labels("test"), target_precision)
        metrics["training"] = training_summary(fitted.history, cfg)
        if crop_skipped:
            metrics["training"]["crop_net_skipped"] = crop_skipped
        if metrics["training"]["cut_by_time_budget"]:
            warn_budget_cut(metrics["training"], progress)
        clock.lap("evaluate")
        params = {
            "profile": profile, "config": cfg.flat(), "data": str(data), "format": fmt,
            "class_counts": prepared.counts, "splits": {k: len(v) for k, v in prepared.prep.samples.items()},
            "history": fitted.history, "feature_cache": fitted.cache_counts, "tensorboard": str(tb_root),
            "weights_note": note,
            "matcher": {"references": cal.matcher.n_references, "per_class": cal.matcher.references_per_class()}
            if cal.matcher else None,
        }
        result = register_and_activate(ctx, prepared, fitted, cal, cfg, tag, metrics, params, activate, progress, clock)
        counts.update({"version": result["version"], "activated": result["activated"],
                       "train_samples": len(prepared.prep.samples["train"]),
                       "test_samples": len(prepared.prep.samples["test"]),
                       "precision": metrics["precision"], "recall": metrics["recall"]})
    # logged for DAG runs and the demo's log; `brandmon train` prints it once, in its summary
    log.info("model %s: held-out test (%s) logo precision %.3f, recall %.3f, brand top-1 %.3f%s", result["version"],
             cal.main, metrics["precision"], metrics["recall"], metrics["brand_accuracy"],
             " (activated)" if result["activated"] else "")
    return result


def fit_crop_net(prepared: TrainingData, cfg: TrainConfig, history: dict[str, Any], progress: Progress | None) -> Any:
    """The crop net on the training split's boxes, within its own time budget; its run joins `history`."""
    from pipeline.detector.cropnet import train_crop_net

    prep = prepared.prep
    say(progress, f"crop net: {sum(len(b) for _a, b in prep.photos)} boxes in {len(prep.photos)} training photos, "
        f"{len(prep.backgrounds)} logo-free photos; {cfg.fit.crop_net_budget_s:.0f} s")
    net, hist = train_crop_net(prep.photos, prep.backgrounds, prepared.brands, cfg.fit.crop_net_budget_s,
                               seed=cfg.runtime.seed, say=lambda m: say(progress, m))
    history["crop_net"] = hist
    say(progress, f"crop net: {hist['steps']} steps ({hist['patches']} patches) in {hist['seconds']:.0f} s, "
        f"loss {hist['final_loss']}")
    return net


def register_and_activate(
    ctx: Context, prepared: TrainingData, fitted: Fitted, cal: Calibration, cfg: TrainConfig, tag: str,
    metrics: dict[str, Any], params: dict[str, Any], activate: str, progress: Progress | None, clock: StageClock,
) -> dict[str, Any]:
    """Stage 5: save the artifact, register the version, write its reports, apply `activate`."""
    from pipeline.detector import registry
    from pipeline.detector.model import ModelSpec, save_artifact

    spec = ModelSpec(
        classes=prepared.classes, input_size=cfg.model.input_size, weights=tag, dropout=cfg.model.dropout,
        threshold=cal.threshold, combiner=cal.combiner, matcher_threshold=cal.thresholds.get("matcher", {}).get("threshold"),
        extra={"thresholds": {k: v["threshold"] for k, v in cal.thresholds.items()}, "signal": cal.main,
               **({"crop": cal.crop} if cal.crop_net is not None else {})},
    )
    artifact = save_artifact(spec, fitted.net, cal.matcher, cal.crop_net)
    samples = prepared.prep.samples
    params.update(seconds=clock.total(), stage_seconds=clock.seconds)
    version = registry.register(ctx, spec, artifact, fingerprint([*samples["train"], *samples["val"], *samples["test"]]),
                                metrics, params)
    clock.lap("save")
    files = write_reports(ctx, version, samples["test"], cal.signals["test"],
                          (prepared.brands, cal.signals, {k: prepared.labels(k) for k in ("val", "test")}))
    clock.lap("reports")
    baseline = _score_active_on_val(ctx, samples["val"], activate, progress)
    if baseline is not None:
        params["baseline"] = baseline
    record = registry.promote(ctx, version, activate, baseline)
    metrics["promotion"] = record
    log.info("%s", promotion_line(record))  # logged for DAG runs; `brandmon train` prints it once, in its summary
    return {"version": version, "metrics": metrics, "activated": record["promoted"], "params": params,
            "promotion": record, **files}


def training_summary(history: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """How much training each stage got, and whether the time budget cut any stage short.

    Why: with a time budget (the default profile) the epochs a model gets depend on how busy
    the machine was, and a model cut short can look fine on paper while being much worse; the
    registry keeps this next to the precision it reports.
    """
    stages = {name: {k: h[k] for k in ("epochs", "epochs_planned", "steps", "steps_planned") if k in h}
              for name, h in history.items()}
    cut = sorted(name for name, h in history.items() if h.get("stopped_by_time_budget"))
    return {"stages": stages, "time_budget_s": cfg.fit.time_budget_s, "cut_by_time_budget": bool(cut),
            "cut_stages": cut, "deterministic": cfg.runtime.deterministic}


def budget_cut_message(training: dict[str, Any]) -> str:
    """One line: which stage the time budget stopped, after how many of its planned steps."""
    parts = []
    for name in training.get("cut_stages", []):
        st = training["stages"][name]
        parts.append(f"{name} stopped after {st.get('steps')} of {st.get('steps_planned')} steps "
                     f"(epoch {st.get('epochs')} of {st.get('epochs_planned')})")
    budget = training.get("time_budget_s")
    return (f"the time budget of {budget:.0f} s cut training short: " + "; ".join(parts)
            + " (a busy machine trains less; raise --time-budget or retrain when it is idle)")


def warn_budget_cut(training: dict[str, Any], progress: Progress | None) -> None:
    """The budget cut as a warning: logged, and on stderr when progress is shown."""
    say(progress, budget_cut_message(training), level=logging.WARNING)


def promotion_line(record: dict[str, Any]) -> str:
    """The activation decision in one line (`promotion.summary_line`)."""
    from pipeline.detector.promotion import summary_line

    return summary_line(record)


def _score_active_on_val(ctx: Context, val: list[Any], activate: str, progress: Progress | None) -> dict[str, Any] | None:
    """The active model's operating-point figures on the new model's validation split, for `if_better`.

    Why: each model's recorded figures come from its own split; comparing those would compare
    different photos. Scoring the active model, at its own threshold, on the photos the new
    model's thresholds were chosen on compares like with like, and leaves the test split
    report-only. If it cannot be scored (its artifact is gone, say), `registry.promote` falls
    back to its recorded figures and says so.
    """
    import shutil
    import tempfile

    from pipeline.detector.evaluate import evaluate_folder
    from pipeline.detector.promotion import figures
    from pipeline.detector.registry import active_version
    from pipeline.detector.training.report import export_split

    if activate != "if_better" or not val:
        return None
    current = active_version(ctx)
    if current is None:
        return None
    home = Path(ctx.settings.home)
    home.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".val-", dir=home))
    try:
        report = evaluate_folder(ctx, export_split(val, folder), current["version"], progress=progress)
    except BrandmonError as exc:
        say(progress, f"cannot score the active model {current['version']} on the new validation split ({exc}); "
            "comparing with its recorded figures", level=logging.WARNING)
        return None
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    out = figures(report, current["version"], f"scored on the new model's validation split ({report['n_images']} photos)")
    out["signal"] = report["signal"]
    return out
