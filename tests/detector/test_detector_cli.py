from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from detector_helpers import jpeg_bytes, scene, store_images

from pipeline.cli import main


def _env(monkeypatch: pytest.MonkeyPatch, ctx) -> None:
    s = ctx.settings
    monkeypatch.setenv("BRANDMON_DATABASE_URL", s.database_url)
    monkeypatch.setenv("BRANDMON_STORAGE_URL", s.storage_url)
    monkeypatch.setenv("BRANDMON_HOME", str(s.home))
    monkeypatch.setenv("BRANDMON_AUTHOR_SALT", "cli-test")
    monkeypatch.delenv("BRANDMON_CONFIG", raising=False)


def test_cli_modules_do_not_import_tensorflow():
    code = (
        "import sys, pipeline.cli as c, pipeline.detector.jobs, pipeline.detector.cli; c.build_parser(); "
        "print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_help_lists_the_detector_commands(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--format" in text and "boxes" in text and "--weights" in text


def test_model_list_and_detect_without_a_model(make_ctx, monkeypatch, capsys):
    _env(monkeypatch, make_ctx())
    assert main(["model", "list"]) == 0
    assert "no models yet" in capsys.readouterr().out
    assert main(["detect"]) == 2
    err = capsys.readouterr().err
    assert "no active model" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["model", "activate", "v9"]) == 2
    assert "no model version 'v9'" in capsys.readouterr().err


@pytest.mark.integration
def test_cli_evaluate_detect_and_model_list(make_ctx, install_model, monkeypatch, capsys, tmp_path: Path):
    ctx = make_ctx()
    version = install_model(ctx)
    _env(monkeypatch, ctx)
    data = tmp_path / "eval"
    for cls, kind in (("reddisc", "Reddisc"), ("Bluesquare", "Bluesquare"), ("NO_LOGO", None)):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            (data / cls / f"{i}.jpg").write_bytes(jpeg_bytes(scene(kind, 500 + i)))
    assert main(["evaluate", "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 12 and report["model"] == version
    assert {"precision", "recall", "f1"} <= set(report["logo"])
    assert 0 <= report["brand_accuracy"] <= 1 and "Reddisc" in report["per_class"]
    assert set(report["signals"]) == {"cnn"}
    iv = report["intervals"]  # 95% Wilson intervals with their counts
    assert iv["brand_accuracy"]["n"] == 8 and iv["logo_recall"]["n"] == 8 and report["interval_method"].startswith("Wilson")
    assert iv["logo_precision"]["low"] <= report["logo"]["precision"] <= iv["logo_precision"]["high"]

    store_images(ctx, [jpeg_bytes(scene("Reddisc", 900 + i)) for i in range(3)])
    assert main(["detect", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 3
    assert main(["model", "list"]) == 0
    listing = capsys.readouterr().out
    line = next(li for li in listing.splitlines() if version in li)
    assert line.startswith("*")
    assert main(["model", "activate", version]) == 0
    assert f"model {version} is now active" in capsys.readouterr().out
    assert main(["model", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["version"] for r in listed if r["active"]] == [version]
    assert main(["evaluate", "--data", str(data)]) == 0  # the human summary, one line per signal
    summary = capsys.readouterr().out
    assert "cnn" in summary and re.search(r"logo R \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] \(\d+/8\)", summary), summary

    out = tmp_path / "review"
    assert main(["review", "export", "--out", str(out)]) == 0
    assert "queued images" in capsys.readouterr().out and (out / "manifest.csv").exists()
    assert main(["review", "import", str(out), "--into", str(tmp_path / "training")]) == 0
    assert "labelled" in capsys.readouterr().out


@pytest.mark.integration
def test_cli_model_export_then_evaluate_and_detect_with_it(make_ctx, install_model, monkeypatch, capsys, tmp_path: Path):
    """`brandmon model export` (SavedModel: TensorFlow only, so this runs without the optional
    runtimes), then `evaluate` / `detect --runtime savedmodel` score with it."""
    ctx = make_ctx()
    version = install_model(ctx)
    _env(monkeypatch, ctx)
    assert main(["model", "export", version, "--format", "savedmodel", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["format"] == "savedmodel" and meta["precision"] == "fp32" and meta["model_version"] == version
    assert ctx.store.exists(meta["key"])
    data = tmp_path / "eval"
    for cls, kind in (("Reddisc", "Reddisc"), ("no_logo", None)):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            (data / cls / f"{i}.jpg").write_bytes(jpeg_bytes(scene(kind, 600 + i)))
    assert main(["evaluate", "--data", str(data), "--runtime", "savedmodel", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["runtime"] == "savedmodel" and report["n_images"] == 6
    store_images(ctx, [jpeg_bytes(scene("Reddisc", 950 + i)) for i in range(2)])
    assert main(["detect", "--runtime", "savedmodel", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["scored"] == 2
    assert main(["model", "export", version, "--format", "savedmodel", "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "fp32 only" in err and len(err.strip().splitlines()) == 1


@pytest.mark.integration
@pytest.mark.skipif(not all(__import__("importlib").util.find_spec(m) for m in ("openvino", "nncf")),
                    reason="needs openvino + nncf (extra `runtimes`)")
def test_cli_openvino_export_says_what_its_precision_cascade_does(make_ctx, install_model, monkeypatch, capsys):
    ctx = make_ctx()
    version = install_model(ctx)
    _env(monkeypatch, ctx)
    assert main(["model", "export", version, "--format", "openvino", "--calibration-images", "8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "(int8," in out and "precision cascade: photos whose int8 top-two margin is at or below" in out
    assert re.search(r"on \d+ training images it re-scored \d+\.\d% and kept \d+\.\d% of the fp32 top classes", out)
    assert main(["model", "export", version, "--format", "openvino", "--calibration-images", "8", "--rescore", "off",
                 "--json"]) == 0
    assert "rescore_margin" not in json.loads(capsys.readouterr().out)
    with pytest.raises(SystemExit) as exc:
        main(["model", "export", version, "--format", "openvino", "--rescore", "always"])
    assert exc.value.code == 2 and "--rescore: invalid choice" in capsys.readouterr().err
    for n in ("0", "-5", "7"):
        with pytest.raises(SystemExit) as exc:
            main(["model", "export", version, "--format", "openvino", "--calibration-images", n])
        assert exc.value.code == 2 and "--calibration-images" in capsys.readouterr().err
    assert main(["model", "export", version, "--format", "openvino", "--precision", "fp32", "--rescore", "off"]) == 0
    assert "note: --rescore applies to OpenVINO int8 exports only; ignored for openvino fp32" in capsys.readouterr().err


def test_an_export_whose_cascade_costs_much_more_than_int8_says_so():
    """The FL27 model re-scored 42% of photos: 2-4x int8's network time. The export says what
    the user trades (speed against top-class agreement) when the measured cost is 1.5x or more."""
    from pipeline.detector.cli import CASCADE_COST_NOTE, cascade_cost_note

    check = {"rescored_share": 0.42, "int8_top_class_agreement": 0.945, "cascade_top_class_agreement": 1.0}
    note = cascade_cost_note({**check, "network_time_vs_int8": 2.64})
    assert note and "2.6x int8 alone's" in note and "--rescore off" in note and "94.5%" in note
    assert cascade_cost_note({**check, "network_time_vs_int8": CASCADE_COST_NOTE - 0.01}) is None
    for odd in (None, "2.6", True, float("nan")):  # an older export, or a tampered one: no note, no crash
        assert cascade_cost_note({**check, "network_time_vs_int8": odd}) is None


def test_train_help_documents_the_threshold_rule_and_fusion_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--threshold-rule {wilson,point}" in text and "--fusion {val,fitted}" in text
    assert "wilson (default)" in text and "95% Wilson lower bound" in text and "point = the measured precision" in text
    assert "val (default)" in text and "fitted: always the fitted fusion" in text
    assert "if_better (default)" in text


def test_train_choices_match_the_training_config():
    """The CLI keeps its own copy of the choices (no import of the training stages for --help)."""
    from pipeline.airflow_support import TRAIN_OPTION_RANGES
    from pipeline.detector import cli
    from pipeline.detector.metrics import THRESHOLD_RULES
    from pipeline.detector.training.calibrate import FUSION_CHOICES
    from pipeline.detector.training.config import CROP_NET_CHOICES, MATCHER_CHOICES, ModelConfig

    assert cli.THRESHOLD_RULES == THRESHOLD_RULES and cli.FUSION_CHOICES == FUSION_CHOICES
    assert cli.CROP_NET_CHOICES == CROP_NET_CHOICES and ModelConfig().crop_net == CROP_NET_CHOICES[0]
    assert cli.MATCHER_CHOICES == MATCHER_CHOICES
    assert TRAIN_OPTION_RANGES["crop_net_budget_s"][0] <= 1  # the flag's floor is a budget the DAG accepts too


@pytest.mark.parametrize(("flag", "value", "choices"), [
    ("--threshold-rule", "strict", ("wilson", "point")),
    ("--threshold-rule", "Wilson", ("wilson", "point")),
    ("--fusion", "matcher", ("val", "fitted")),
    ("--fusion", "", ("val", "fitted")),
])
def test_train_refuses_an_unknown_rule_or_fusion_in_one_line(flag, value, choices, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), flag, value])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"argument {flag}: invalid choice: " in err and repr(value) in err  # the quoting is argparse's
    assert err.index(choices[0]) < err.index(choices[1], err.index(choices[0]))  # "(choose from ...)"


def test_train_passes_the_rule_and_fusion_to_training(monkeypatch, capsys, tmp_path: Path):
    """Only the flags given are passed: without them TrainConfig's defaults (wilson, val) apply."""
    from pipeline.detector import cli, jobs

    seen: list[dict] = []

    def fake_train(ctx, data, **kw):
        seen.append(kw)
        raise SystemExit(0)  # stop before any training: only the options are checked here

    monkeypatch.setattr(cli, "_ctx", lambda: None)
    monkeypatch.setattr(jobs, "train_model", fake_train)
    for extra in ([], ["--threshold-rule", "point", "--fusion", "fitted"],
                  ["--crop-net", "off", "--crop-net-budget", "90.5"]):
        with pytest.raises(SystemExit):
            main(["train", "--data", str(tmp_path), *extra])
    assert "threshold_rule" not in seen[0] and "fusion" not in seen[0]
    assert seen[1]["threshold_rule"] == "point" and seen[1]["fusion"] == "fitted"
    assert "crop_net" not in seen[0] and "crop_net_budget_s" not in seen[0] and "crop_net" not in seen[1]
    assert seen[2]["crop_net"] == "off" and seen[2]["crop_net_budget_s"] == 90.5


def test_train_help_documents_the_crop_net_flags_with_their_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = re.sub(r"(\w)- (\w)", r"\1-\2", " ".join(capsys.readouterr().out.split()))  # argparse wraps at hyphens
    assert "--crop-net {auto,off}" in text and "--crop-net-budget SECONDS" in text
    assert "auto (default): with boxes and a matcher, also train the crop net" in text and "off: skip it" in text
    assert "taken out of --time-budget" in text and "(default: 840 with the default profile, else 420)" in text


def test_the_crop_net_defaults_in_help_are_the_configs():
    from pipeline.detector.training.config import PROFILES, FitConfig

    assert PROFILES["default"]["crop_net_budget_s"] == 840 and FitConfig().crop_net_budget_s == 420
    assert "crop_net_budget_s" not in PROFILES["demo"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--crop-net", "Auto"], "argument --crop-net: invalid choice: 'Auto'"),
    (["--crop-net-budget", "0"], "argument --crop-net-budget: must be from 1 to "),
    (["--crop-net-budget", "-60"], "argument --crop-net-budget: must be from 1 to "),
    (["--crop-net-budget", "nan"], "argument --crop-net-budget: must be from 1 to "),
    (["--crop-net-budget", "1e12"], "argument --crop-net-budget: must be from 1 to "),
    (["--crop-net-budget", "soon"], "argument --crop-net-budget: not a number: 'soon'"),
])
def test_train_refuses_a_bad_crop_net_flag_in_one_line(extra, message, capsys, tmp_path: Path):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("extra", [
    ["--threshold-rule", "w" * 5000],
    ["--crop-net", "a b " * 2500],
    ["--fine-tune", "9" * 4999 + "x"],
    ["--epochs", "e" * 5000],
    ["--crop-net-budget", "1" + "0" * 4999],
    ["w" * 5000],  # an unrecognized argument
])
def test_a_long_bad_value_is_echoed_cut_short(extra, capsys, tmp_path: Path):
    """Outside check (#14): a 5000-character value was echoed whole; now 40 characters and an ellipsis."""
    with pytest.raises(SystemExit) as exc:
        main(["train", "--data", str(tmp_path), *extra])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1
    assert len(err) < 250 and "…" in err and extra[-1][:40] in err and extra[-1][:41] not in err, err


@pytest.mark.integration
def test_cli_train_with_the_old_rule_then_if_better_says_why(make_ctx, monkeypatch, capsys, tmp_path: Path):
    """`--threshold-rule point --fusion fitted` reach the model; the next `train` prints the
    promotion decision with both models' figures, and the registry keeps it."""
    from detector_helpers import FAST, make_folders

    from pipeline.detector import jobs
    from pipeline.detector.registry import get_version

    ctx = make_ctx()
    _env(monkeypatch, ctx)
    real = jobs.train_model
    monkeypatch.setattr(jobs, "train_model", lambda *a, **kw: real(*a, **{**FAST, **kw}))
    data = make_folders(tmp_path / "train", {"Reddisc": 16, "no_logo": 16}, seed=5)
    args = ["train", "--data", str(data), "--weights", "none", "--quiet", "--input-size", "75"]
    assert main([*args, "--threshold-rule", "point", "--fusion", "fitted", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["activated"] and first["promotion"]["reason"] == "no active model yet"
    row = get_version(ctx, first["version"])
    assert row["params"]["config"]["threshold_rule"] == "point" and row["params"]["config"]["fusion"] == "fitted"
    assert {t["rule"] for t in row["metrics"]["thresholds"].values()} == {"point"}

    loud = [a for a in args if a != "--quiet"]  # with progress shown the decision is still said once
    assert main([*loud, "--threshold-rule", "wilson"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert (out + captured.err).count("if_better: v2 ") == 1
    assert (out + captured.err).count("held-out test") == 1  # the summary's line, not the job's as well
    assert re.search(r"^model v2( \(active\))?: held-out test split \(", out, re.M)
    line = next(li for li in out.splitlines() if li.startswith("if_better: v2 "))
    assert re.match(r"if_better: v2 (promoted|not promoted): (both reach|neither reaches|the (new|active) model's)", line)
    assert f"active {first['version']} R " in line and "scored on the new model's validation split" in line
    stored = get_version(ctx, "v2")["metrics"]["promotion"]
    assert stored["reason"] in line and stored["active"]["version"] == first["version"]
    assert get_version(ctx, "v2")["active"] is stored["promoted"]


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_hand_edited_metrics_row_is_read_as_empty_not_a_crash(make_ctx, monkeypatch, capsys, caplog, backend):
    """Outside check (stop 20): an active model whose `metrics` JSON was hand-edited into a
    string broke `status`, `aggregate` and `model list` with internal errors; a non-numeric
    precision broke `model list`'s table. Now the row reads as empty metrics with a warning
    naming the version, and the table shows `n/a`."""
    from types import SimpleNamespace

    from sqlalchemy import update

    from pipeline.detector.registry import (
        activate,
        active_row,
        get_version,
        list_versions,
        register,
    )
    from pipeline.schema import model_versions

    ctx = make_ctx(backend=backend)
    spec = SimpleNamespace(classes=["no_logo", "Acme"], base="inception_v3", weights="none", input_size=75, threshold=0.5)
    v1 = register(ctx, spec, b"artifact-1", "fp", {"precision": "high", "recall": 0.5, "signal": ["fused"]}, {})
    v2 = register(ctx, spec, b"artifact-2", "fp", {"precision": 0.9, "recall": 0.6}, {})
    activate(ctx, v2)
    with ctx.engine.begin() as conn:
        conn.execute(update(model_versions).where(model_versions.c.version == v2).values(metrics="garbage"))
    with ctx.engine.connect() as conn:
        assert active_row(conn)["metrics"] == {}
    assert get_version(ctx, v2)["metrics"] == {}
    assert [r["metrics"] for r in list_versions(ctx)][1] == {}
    assert f"model {v2}: its stored metrics are a str, not a JSON object; read as empty" in caplog.text
    if backend != "sqlite":
        return  # the commands below read the environment of a local (SQLite + folder) home
    _env(monkeypatch, ctx)
    capsys.readouterr()
    for argv in (["model", "list"], ["status"], ["aggregate"]):
        assert main(argv) == 0, argv
        captured = capsys.readouterr()
        assert "internal error" not in captured.err and "Traceback" not in captured.err, argv
        if argv == ["model", "list"]:
            table = captured.out.splitlines()
            row1 = next(line for line in table if v1 in line)
            assert "n/a" in row1 and "0.500" in row1 and "['fused']" not in row1
            assert any(v2 in line and line.startswith("*") and line.count("n/a") == 2 for line in table)


def test_promotion_reads_a_row_whose_signal_is_not_a_name():
    """Outside check (stop 20): `metrics.signal` hand-edited into a list crashed `brandmon
    train` after training (unhashable type), leaving the new version without its promotion
    record. A non-string signal now falls back to the headline figures."""
    from pipeline.detector.promotion import recorded_figures

    row = {"version": "v1", "metrics": {"signal": ["fused"], "val": {"fused": {"precision": 0.99}},
                                         "precision": 0.9, "recall": 0.5}}
    figures = recorded_figures(row)
    assert figures["source"] == "recorded headline figures (its own split)"
    assert recorded_figures({"version": "v1", "metrics": "garbage"})["source"].startswith("recorded headline")


def test_the_export_line_says_which_runtime_setting_scores_with_it():
    """`auto` never picks a SavedModel, and picks TFLite only without a faster export: the line
    printed after an export said `detect uses it (detector.runtime: auto)` for every format."""
    from pipeline.detector.cli import _export_use

    assert "auto does not pick it" in _export_use("savedmodel") and "--runtime savedmodel" in _export_use("savedmodel")
    assert _export_use("openvino").endswith("(detector.runtime: auto)")
    assert _export_use("tflite").endswith("(detector.runtime: auto, unless the model also has an openvino or onnx export)")


def test_export_notes_flags_that_do_not_apply_and_refuses_a_missing_artifact(make_ctx, install_model, monkeypatch,
                                                                              capsys, tmp_path: Path):
    """--calibration with an fp32 export was silently ignored; an export of a model whose
    artifact is gone from the lake was `internal error: KeyError`."""
    from pipeline.detector.registry import get_version

    ctx = make_ctx()
    version = install_model(ctx)
    _env(monkeypatch, ctx)
    (tmp_path / "cal").mkdir()
    assert main(["model", "export", version, "--format", "savedmodel", "--calibration", str(tmp_path / "cal")]) == 0
    captured = capsys.readouterr()
    assert "note: --calibration and --calibration-images apply to int8 exports only" in captured.err
    assert "auto does not pick it" in captured.out
    ctx.store.delete(get_version(ctx, version)["artifact_key"])
    assert main(["model", "export", version, "--format", "savedmodel"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is missing from the lake; restore it" in err and "internal" not in err
