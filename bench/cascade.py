"""Can a precision cascade give int8 speed with the fp32 model's top class? (issue 15)

The cascade scores every image with the int8 OpenVINO export and re-scores, with the
higher-precision IR (fp32 weights, run in bf16 or in f32), the images whose int8 top-1/top-2
probability margin is below m. This script measures, on an FL27 model (`--home`: a copy of a
`bench/fl27.py --home`; the script writes exports into its lake):

1. the int8 margin distribution, and how far int8 moves the margin against Keras fp32, for
   two int8 IRs of the same fp32 IR: NNCF with its fast bias correction (the export's setting
   before this script) and with its full bias correction (the export's setting now);
2. per m: the re-score fraction and the top-class agreement with Keras fp32 of the cascade
   (with bf16 and with f32 re-scoring) on the model's training and validation photos (where m
   is chosen) and on the held-out test photos (where it is only reported);
3. the network's CPU time per image in int8, in the bf16 IR and in the f32 IR at the
   throughput bench's size (Inception v3, 299 px, random weights) and at the model's own size,
   and from them the end-to-end rate the cascade can reach at the chosen m (and the re-score
   fraction that 45 img/s leaves room for).

    nice -n 5 .venv/bin/python bench/cascade.py --home COPY_OF_FL27_HOME [--train-images 300]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

GRID = [0.0, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.12, 0.15, 0.2]


def margins(p: np.ndarray) -> np.ndarray:
    s = np.sort(p, 1)
    return s[:, -1] - s[:, -2]


def curve(ref: np.ndarray, low: np.ndarray, high: dict[str, np.ndarray], grid: list[float]) -> list[dict]:
    """Per m: re-scored fraction and top-class agreement of int8 + re-score with each `high`."""
    m8 = margins(low)
    top = ref.argmax(1)
    rows = []
    for m in grid:
        redo = m8 < m
        row = {"m": m, "rescored": round(float(redo.mean()), 4)}
        for name, hi in high.items():
            got = np.where(redo[:, None], hi, low)
            row[f"agree_{name}"] = round(float((got.argmax(1) == top).mean()), 4)
        rows.append(row)
    return rows


def smallest_m(ref: np.ndarray, low: np.ndarray, hi: np.ndarray, target: float) -> float:
    """The smallest m (over the observed int8 margins) whose cascade agreement is >= target."""
    m8 = margins(low)
    top = ref.argmax(1)
    for m in [0.0, *sorted(set(np.round(m8 + 1e-6, 6).tolist()))]:
        got = np.where((m8 < m)[:, None], hi, low)
        if (got.argmax(1) == top).mean() >= target:
            return float(m)
    return float("inf")


def applied(p: dict[str, np.ndarray], variant: str, hi: str, m: float) -> dict[str, float]:
    redo = margins(p[variant]) < m
    got = np.where(redo[:, None], p[hi], p[variant])
    return {"rescored": round(float(redo.mean()), 4), "agree": round(float((got.argmax(1) == p["keras"].argmax(1)).mean()), 4)}


def zipped(files: dict[str, bytes], precision: str) -> bytes:
    """An export zip around bare OpenVINO IR files (for open_export)."""
    import io
    import zipfile

    from pipeline.detector.runtimes import EXPORT_FORMAT

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("export.json", json.dumps({"export_format": EXPORT_FORMAT, "format": "openvino", "precision": precision}))
        for n, b in files.items():
            zf.writestr(n, b)
    return buf.getvalue()


def cpu_ms_per_image(predict, batch: np.ndarray, seconds: float = 5.0) -> tuple[float, float]:
    predict(batch)
    t0, c0, k = time.perf_counter(), time.process_time(), 0
    while time.perf_counter() - t0 < seconds:
        predict(batch)
        k += len(batch)
    return round(1000 * (time.process_time() - c0) / k, 2), round(k / (time.perf_counter() - t0), 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--home", type=Path, required=True, help="a COPY of a bench/fl27.py --home (exports are written)")
    ap.add_argument("--train-images", type=int, default=300, help="training photos beside the validation ones")
    ap.add_argument("--target", type=float, default=0.995)
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--timing-only", action="store_true", help="only the 299 px network and cascade timing")
    args = ap.parse_args()
    if args.timing_only:
        t = timing_299()
        print(json.dumps(t, indent=1))
        return 0

    from pipeline.context import Context
    from pipeline.detector.data import decode_rgb, load_boxes, load_folders
    from pipeline.detector.export import CALIBRATION_IMAGES, calibration_batch, export_model
    from pipeline.detector.model import resize_batch
    from pipeline.detector.quantize import quantize_ir
    from pipeline.detector.registry import active_version, load_model
    from pipeline.detector.runtimes import export_key, open_export, read_export
    from pipeline.detector.split import DEFAULT_FRACTIONS, split_of
    from pipeline.settings import load_settings

    load0 = os.getloadavg()
    home = args.home
    env = {"BRANDMON_HOME": str(home / "var"), "BRANDMON_DATABASE_URL": f"sqlite:///{home / 'fl27.db'}",
           "BRANDMON_STORAGE_URL": (home / "lake").as_uri(), "BRANDMON_AUTHOR_SALT": "bench"}
    ctx = Context(load_settings(env=env))
    row = active_version(ctx)
    version = row["version"]
    params = row["params"] or {}
    keras = load_model(ctx, version, precision="fp32", runtime="keras", with_matcher=False)
    size = keras.spec.input_size

    # The photos: validation and training (after the calibration ones) from the training data,
    # test from the held-out folder the FL27 run wrote.
    fractions = tuple((params.get("config") or {}).get("fractions") or DEFAULT_FRACTIONS)
    sources = sorted(load_boxes(params["data"]), key=lambda s: s.sha256)
    train = [s for s in sources if split_of(s.sha256, fractions) == "train"][CALIBRATION_IMAGES:][: args.train_images]
    val = [s for s in sources if split_of(s.sha256, fractions) == "val"]
    test = load_folders(home / "var" / "eval" / version)
    sets = {"train": train, "val": val, "test": test}
    x = {k: resize_batch([decode_rgb(s.read()) for s in v], size) for k, v in sets.items()}
    print(f"model {version} at {size} px; photos: " + ", ".join(f"{k} {len(v)}" for k, v in x.items()), flush=True)

    def run(fn, xs: np.ndarray) -> np.ndarray:
        return np.concatenate([fn(xs[i:i + 32]) for i in range(0, len(xs), 32)])

    probs: dict[str, dict[str, np.ndarray]] = {k: {"keras": run(keras.predict_arrays, v)} for k, v in x.items()}
    # The fp32 IR (run in bf16 and in f32) and two int8 IRs of it: NNCF with its fast bias
    # correction (the export's setting until this run) and with the full one (now the default).
    export_model(ctx, version, "openvino", precision="fp32")
    blob32 = ctx.store.get(export_key(row["artifact_key"], "openvino"))
    _, ir = read_export(blob32)
    calib = calibration_batch(ctx, row, size)
    nets = {"bf16": open_export(blob32, 2, precision="bf16"), "f32": open_export(blob32, 2, precision="fp32")}
    out: dict = {"model": version, "input_size": size, "photos": {k: len(v) for k, v in x.items()}, "quantizer": {}}
    for variant, fast in (("int8_fast", True), ("int8_full", False)):
        xml8, bin8, stats = quantize_ir(ir["model.xml"], ir["model.bin"], calib, fast_bias_correction=fast)
        out["quantizer"][variant] = stats
        nets[variant] = open_export(zipped({"model.xml": xml8, "model.bin": bin8}, "int8"), 2)
    for k, v in x.items():
        for name, net in nets.items():
            probs[k][name] = run(net.predict, v)

    for k in x:
        p = probs[k]
        ref_top = p["keras"].argmax(1)
        out[k] = {"agree": {n: round(float((p[n].argmax(1) == ref_top).mean()), 4) for n in nets},
                  "keras_margin_median": round(float(np.median(margins(p["keras"]))), 4)}
        print(f"{k}: top-class agreement with Keras fp32: " + ", ".join(f"{n} {100 * a:.1f}%" for n, a in out[k]["agree"].items())
              + f" (Keras fp32 median margin {out[k]['keras_margin_median']})", flush=True)
        for variant in ("int8_fast", "int8_full"):
            m8, mref = margins(p[variant]), margins(p["keras"])
            flipped = p[variant].argmax(1) != ref_top
            o = out[k][variant] = {
                "int8_margin_quantiles": {q: round(float(np.quantile(m8, q)), 4) for q in (0.01, 0.05, 0.1, 0.25, 0.5)},
                "margin_shift_abs_median": round(float(np.median(np.abs(m8 - mref))), 4),
                "margin_shift_abs_p95": round(float(np.quantile(np.abs(m8 - mref), 0.95)), 4),
                "flipped_int8_margins": sorted(round(float(v), 4) for v in m8[flipped]),
                "curve": curve(p["keras"], p[variant], {"bf16": p["bf16"], "f32": p["f32"]}, GRID),
            }
            print(f"  {variant}: int8 margin quantiles {o['int8_margin_quantiles']}; |int8 - fp32 margin| median "
                  f"{o['margin_shift_abs_median']} p95 {o['margin_shift_abs_p95']}; int8 margins of the {int(flipped.sum())} "
                  f"flipped photos {o['flipped_int8_margins']}", flush=True)
            for r in o["curve"]:
                print(f"    m={r['m']:<6} re-scored {100 * r['rescored']:5.1f}%  agreement with bf16 re-scoring "
                      f"{100 * r['agree_bf16']:5.1f}%, with f32 {100 * r['agree_f32']:5.1f}%", flush=True)

    # m chosen on training + validation photos (the brief's rule: the smallest m reaching the
    # target there), applied to test; and the m of a fixed re-score fraction on train + val.
    for variant in ("int8_fast", "int8_full"):
        fit = {n: np.concatenate([probs["train"][n], probs["val"][n]]) for n in ("keras", variant, "bf16", "f32")}
        for hi in ("bf16", "f32"):
            m = smallest_m(fit["keras"], fit[variant], fit[hi], args.target)
            res = {"m": m, **{k: applied(probs[k], variant, hi, m) for k in x}}
            out[f"chosen_{variant}_{hi}"] = res
            print(f"{variant} + {hi} re-scoring: m={m:.4f} (smallest reaching {100 * args.target:.1f}% on train+val); "
                  + "; ".join(f"{k}: re-scored {100 * res[k]['rescored']:.1f}%, agreement {100 * res[k]['agree']:.1f}%"
                              for k in x), flush=True)
        fm = margins(fit[variant])
        for frac in (0.03, 0.05, 0.063, 0.08, 0.1, 0.12):
            m = float(np.quantile(fm, frac))
            res = {k: applied(probs[k], variant, "f32", m) | {"agree_bf16": applied(probs[k], variant, "bf16", m)["agree"]} for k in x}
            out.setdefault(f"fraction_{variant}", []).append({"fit_fraction": frac, "m": round(m, 4), **res})
            print(f"  {variant}, m at {100 * frac:.1f}% of train+val re-scored ({m:.4f}): test re-scored "
                  f"{100 * res['test']['rescored']:.1f}%, agreement {100 * res['test']['agree']:.1f}% (f32 re-scoring), "
                  f"{100 * res['test']['agree_bf16']:.1f}% (bf16)", flush=True)

    if not args.skip_timing:
        out["timing"] = timing(ctx, x["test"], nets, size)
        t = out["timing"]
        budget = t["299"]["pipeline_cpu_ms_int8"] * (t["299"]["pipeline_img_s_int8"] / 45 - 1)
        print(f"45 img/s at 299 px leaves {budget:.1f} ms CPU/img for re-scoring: at most "
              f"{100 * budget / t['299']['net_cpu_ms_bf16']:.1f}% of images in bf16, "
              f"{100 * budget / t['299']['net_cpu_ms_f32']:.1f}% in f32", flush=True)
        for key in [k for k in out if k.startswith("chosen_")]:
            hi = key.rsplit("_", 1)[1]
            for k in ("val", "test"):
                f = out[key][k]["rescored"]
                est = t["299"]["pipeline_cpu_ms_int8"] + f * t["299"][f"net_cpu_ms_{hi}"]
                print(f"estimate at 299 px, {key[7:]}, {k} fraction {100 * f:.1f}%: {est:.1f} ms CPU/img "
                      f"-> ~{t['299']['pipeline_img_s_int8'] * t['299']['pipeline_cpu_ms_int8'] / est:.1f} img/s "
                      "(the int8 pipeline's rate scaled by CPU per image)", flush=True)
    load1 = os.getloadavg()
    out["load_avg_start_end"] = [round(load0[0], 2), round(load1[0], 2)]
    print(f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}; {os.cpu_count()} cores", flush=True)
    ctx.close()
    print(json.dumps(out, indent=1))
    return 0


def timing(ctx, test_x: np.ndarray, nets: dict, size: int) -> dict:
    """Network CPU ms/img per precision at the model's size and at 299 px (random Inception v3);
    the int8 pipeline's reference figures (bench/results/detect.txt run 8) for the estimate."""
    out: dict = {str(size): {}}
    batch = np.ascontiguousarray(np.resize(test_x, (32, size, size, 3)))
    for name, net in nets.items():
        out[str(size)][f"net_cpu_ms_{name}"], out[str(size)][f"net_img_s_{name}"] = cpu_ms_per_image(net.predict, batch)
    print(f"network alone at {size} px (batch 32): {out[str(size)]}", flush=True)
    out["299"] = timing_299()
    return out


def timing_299() -> dict:
    """At 299 px (random-weight Inception v3): each network alone on a batch of 32, and the
    cascade itself: int8 on the batch, then the fp32 IR in bf16 on k of its images (the ones
    re-scored), k = 2, 4, 8 (6.3%, 12.5%, 25%), as one call per batch the way detect would."""
    from pipeline.detector.export import export_files
    from pipeline.detector.model import ModelSpec, build_network
    from pipeline.detector.runtimes import open_export

    classes = ["no_logo", "Acme", "Globex", "Initech"]
    net = build_network(len(classes), 299)
    spec = ModelSpec(classes=classes, input_size=299, weights="none", threshold=0.5)
    rng = np.random.default_rng(0)
    calib = rng.integers(0, 256, (16, 299, 299, 3), dtype=np.uint8)
    big = rng.integers(0, 256, (32, 299, 299, 3), dtype=np.uint8)
    info: dict = {}
    f8 = zipped(export_files("openvino", net, spec, "int8", calib, info), "int8")  # full bias correction
    f32 = zipped(export_files("openvino", net, spec, "fp32", None), "fp32")
    t = {"pipeline_cpu_ms_int8": 33.5, "pipeline_img_s_int8": 49.65,
                      "quantize_seconds_16_images": info.get("quantize_seconds"),
                      "quantize_peak_rss_mb": round(info.get("quantize_peak_rss_bytes", 0) / 2**20)}
    nets = {name: open_export(blob, 2, precision=prec) for name, blob, prec in
            (("int8", f8, "auto"), ("bf16", f32, "bf16"), ("f32", f32, "fp32"))}
    for name, net in nets.items():
        t[f"net_cpu_ms_{name}"], t[f"net_img_s_{name}"] = cpu_ms_per_image(net.predict, big)
    for k in (2, 4, 8):
        def cascade(x: np.ndarray, k: int = k) -> np.ndarray:
            p = nets["int8"].predict(x)
            p[:k] = nets["bf16"].predict(x[:k])
            return p
        t[f"cascade_cpu_ms_bf16_{k}_of_32"], t[f"cascade_img_s_bf16_{k}_of_32"] = cpu_ms_per_image(cascade, big)
    print(f"network alone at 299 px (batch 32, random weights; int8 with full bias correction), and int8 + k of "
          f"32 re-scored in bf16: {t}", flush=True)
    return t


if __name__ == "__main__":
    sys.exit(main())
