"""`--activate if_better`: does a new model beat the active one at what the product promises?

What a model promises is its operating point: logo precision at least the target on new photos
(the `wilson` threshold rule ships the lowest threshold whose 95% Wilson lower bound of
validation precision reaches it), and as much recall as that leaves. So both models are scored
on the same photos -- the new model's validation split, where thresholds are chosen (the test
split stays report-only) -- each at the threshold it ships, and compared in this order:

1. a model whose precision lower bound reaches the target beats one whose does not;
2. then the higher recall, then the higher brand top-1, then the higher F1;
3. when neither reaches the target, the higher precision lower bound comes first (the model
   closer to the promise), then the same order;
4. a tie keeps the active model: switching restates image counts, which is only worth it for a
   measurably better model.

Why not F1 alone: a model calibrated under the old `point` rule ships a lower threshold, so its
F1 is higher while its precision on new photos is not what it claims; a more cautious model
that is better at the operating point lost to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.detector.metrics import wilson_interval

RULE = ("on the new model's validation split, each model at its own threshold: reaching the target "
        "with the 95% Wilson lower bound of precision first, then recall, brand top-1, F1 "
        "(neither reaching it: the higher lower bound first); a tie keeps the active model")
ORDER = ("recall", "brand_accuracy", "f1")
NAMES = {"precision_low": "precision lower bound", "recall": "recall", "brand_accuracy": "brand top-1", "f1": "F1"}


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def figures(report: Mapping[str, Any], version: str, source: str) -> dict[str, Any]:
    """One model's operating-point figures from an `evaluate_scores`-shaped report (or the
    registry's flat legacy metrics: `precision`, `recall`, `f1` at the top level).

    `precision_low` is recomputed from the counts (unrounded), so a model exactly at the target
    is judged the way its threshold was chosen; None when the report has no counts.
    """
    logo = report.get("logo") if isinstance(report.get("logo"), Mapping) else report
    iv = ((report.get("intervals") or {}).get("logo_precision") or {}) if isinstance(report.get("intervals"), Mapping) else {}
    low = None
    if isinstance(iv.get("k"), int) and isinstance(iv.get("n"), int) and 0 <= iv["k"] <= iv["n"]:
        low = wilson_interval(iv["k"], iv["n"])[0] if iv["n"] else 0.0
    elif _num(iv.get("low")) is not None:
        low = float(iv["low"])
    return {
        "version": version, "source": source, "n_images": report.get("n_images"),
        "threshold": _num(report.get("threshold")), "precision": _num(logo.get("precision")),
        "precision_low": round(low, 4) if low is not None else None, "called": iv.get("n"),
        "recall": _num(logo.get("recall")), "brand_accuracy": _num(report.get("brand_accuracy")),
        "f1": _num(logo.get("f1")),
    }


def recorded_figures(row: Mapping[str, Any]) -> dict[str, Any]:
    """A registry row's own recorded figures: its validation split at its main signal when the
    metrics have it, else the headline (test) figures of an older model."""
    metrics = row.get("metrics") if isinstance(row.get("metrics"), Mapping) else {}
    signal = metrics.get("signal")
    val = metrics["val"].get(signal) if isinstance(metrics.get("val"), Mapping) and isinstance(signal, str) else None
    if isinstance(val, Mapping):
        return figures(val, row["version"], "recorded on its own validation split")
    return figures(metrics, row["version"], "recorded headline figures (its own split)")


def _key(f: Mapping[str, Any], floor_met: bool) -> tuple[float, ...]:
    vals = [f.get(k) for k in ORDER] if floor_met else [f.get("precision_low"), *(f.get(k) for k in ORDER)]
    return tuple(-1.0 if v is None else float(v) for v in vals)


def _floor(f: Mapping[str, Any], target: float) -> bool:
    low = f.get("precision_low")
    return low is not None and low >= target - 1e-12


def compare(new: Mapping[str, Any], active: Mapping[str, Any], target: float) -> dict[str, Any]:
    """The promotion record: both models' figures (each with `floor_met`), the rule, the
    decision (`promoted`) and a one-line `reason` a user can read."""
    new = {**new, "floor_met": _floor(new, target)}
    active = {**active, "floor_met": _floor(active, target)}
    record = {"policy": "if_better", "rule": RULE, "target_precision": target, "new": new, "active": active}
    if new["floor_met"] != active["floor_met"]:
        promoted = new["floor_met"]
        meets, misses = (new, active) if promoted else (active, new)
        who = ("the new model", "the active model") if promoted else ("the active model", "the new model")
        reason = (f"{who[1]}'s precision lower bound {_fmt(misses['precision_low'])} misses the target {target:g}; "
                  f"{who[0]}'s {_fmt(meets['precision_low'])} reaches it")
        return {**record, "promoted": promoted, "reason": reason}
    keys = ORDER if new["floor_met"] else ("precision_low", *ORDER)
    state = "both reach" if new["floor_met"] else "neither reaches"
    for name, a, b in zip(keys, _key(new, new["floor_met"]), _key(active, active["floor_met"]), strict=True):
        if a != b:
            promoted = a > b
            reason = (f"{state} the target {target:g}; {'higher' if promoted else 'lower'} {NAMES[name]} "
                      f"({_fmt(new.get(name))} new vs {_fmt(active.get(name))} active)")
            return {**record, "promoted": promoted, "reason": reason}
    return {**record, "promoted": False, "reason": f"{state} the target {target:g}; a tie on every figure keeps the active model"}


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def summary_line(record: Mapping[str, Any]) -> str:
    """`if_better: promoted v3 over v2 (...reason...); new R 0.78 at P-low 0.91, active ...`."""
    if record.get("policy") != "if_better" or "active" not in record:
        return f"activation: {record.get('reason', record.get('policy'))}"
    new, act = record["new"], record["active"]

    def side(f: Mapping[str, Any]) -> str:
        return (f"{f['version']} R {_fmt(f.get('recall'))} at P {_fmt(f.get('precision'))} "
                f"(lower bound {_fmt(f.get('precision_low'))}), top-1 {_fmt(f.get('brand_accuracy'))}, F1 {_fmt(f.get('f1'))}")

    verdict = "promoted" if record["promoted"] else "not promoted"
    where = act.get("source") or ""
    return (f"if_better: {new['version']} {verdict}: {record['reason']}. New {side(new)}; active {side(act)}"
            + (f" [active {where}]" if where else ""))
