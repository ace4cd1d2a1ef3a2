"""The CLI: help lists every command; bad settings end in one clear line, not a traceback."""

from __future__ import annotations

import pytest

from pipeline.cli import main

COMMANDS = ["db", "demo", "ingest", "backfill", "detect", "train", "evaluate", "aggregate", "trends", "status"]


def test_help_lists_all_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"\n    {name} " in out or f"\n    {name}\n" in out, name


@pytest.mark.parametrize(("argv", "shown"), [
    (["demo", "--threads", "7" * 5000], "argument --threads: invalid int value: '" + "7" * 40 + "…'"),
    (["train", "--data", "d", "--profile", "p " * 2500], "argument --profile: invalid choice: '" + "p " * 20 + "…'"),
    (["train", "--data", "d", "--profile", "fast"], "argument --profile: invalid choice: 'fast' (choose from"),  # short: whole
    (["status", "x" * 5000], "unrecognized arguments: " + "x" * 40 + "… (see"),
])
def test_a_usage_error_cuts_a_long_value_to_one_short_line(argv, shown, capsys) -> None:
    """argparse echoes a bad value whole (a 5000-character one filled the terminal): cut to 40 + `…`."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 250, err[:300]
    assert shown in " ".join(err.split()), err


def _run(monkeypatch, capsys, tmp_path, argv: list[str], **env: str) -> tuple[int, str]:
    for key in ("BRANDMON_DATABASE_URL", "BRANDMON_STORAGE_URL", "BRANDMON_CONFIG", "BRANDMON_S3_ENDPOINT_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("BRANDMON_HOME", str(tmp_path / "var"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(argv)
    captured = capsys.readouterr()
    _run.last_out = captured.out  # type: ignore[attr-defined]
    return code, captured.err


def _one_clear_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("brandmon: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_db_upgrade_and_status_work(monkeypatch, capsys, tmp_path) -> None:
    code, _ = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"])
    assert code == 0
    code, _ = _run(monkeypatch, capsys, tmp_path, ["status"])
    assert code == 0


def test_status_before_upgrade_says_what_to_do(monkeypatch, capsys, tmp_path) -> None:
    code, _ = _run(monkeypatch, capsys, tmp_path, ["status"])
    assert code == 1
    assert "brandmon db upgrade" in _run.last_out  # type: ignore[attr-defined]


def test_unknown_url_scheme(monkeypatch, capsys, tmp_path) -> None:
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_STORAGE_URL="gopher://x")
    assert code == 2
    assert "unknown scheme 'gopher'" in _one_clear_line(err)


def test_unreachable_database(monkeypatch, capsys, tmp_path) -> None:
    from tests.support.services import free_port

    url = f"postgresql+psycopg2://bm:topsecret@127.0.0.1:{free_port()}/bm?connect_timeout=2"
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_DATABASE_URL=url)
    line = _one_clear_line(err)
    assert code == 2 and "cannot reach the database" in line and "topsecret" not in err


def test_malformed_yaml(monkeypatch, capsys, tmp_path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("brands:\n  - name: [unclosed\n")
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_CONFIG=str(cfg))
    assert code == 2 and "malformed YAML at line" in _one_clear_line(err)


@pytest.mark.integration
def test_missing_bucket(monkeypatch, capsys, tmp_path, s3_endpoint: str) -> None:
    code, err = _run(
        monkeypatch, capsys, tmp_path, ["db", "upgrade"],
        BRANDMON_STORAGE_URL="s3://bucket-that-is-not-there/lake", BRANDMON_S3_ENDPOINT_URL=s3_endpoint,
    )
    assert code == 2 and "bucket-that-is-not-there" in _one_clear_line(err)


def test_detector_section_that_is_not_a_mapping(monkeypatch, capsys, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("detector: 5\n")
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_CONFIG=str(cfg))
    assert code == 2 and "`detector` must be a mapping" in _one_clear_line(err)


def test_database_driver_not_installed(monkeypatch, capsys, tmp_path) -> None:
    url = "postgresql+pg8000://bm:topsecret@127.0.0.1/bm"
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_DATABASE_URL=url)
    line = _one_clear_line(err)
    assert code == 2 and "'pg8000'" in line and "not installed" in line and "postgresql+psycopg2://" in line
    assert "topsecret" not in err


def test_source_option_of_the_wrong_type(monkeypatch, capsys, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources:\n  - {name: m, kind: mastodon, base_url: https://x.example, hashtags: [a], max_pages: lots}\n")
    argv = ["ingest", "m", "--start", "2026-10-01", "--end", "2026-10-02"]
    code, err = _run(monkeypatch, capsys, tmp_path, argv, BRANDMON_CONFIG=str(cfg))
    line = _one_clear_line(err)
    assert code == 2 and "`max_pages` must be a whole number" in line and "'lots'" in line


def test_file_url_with_a_host_part(monkeypatch, capsys, tmp_path) -> None:
    code, err = _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], BRANDMON_STORAGE_URL="file://relative/lake")
    line = _one_clear_line(err)
    assert code == 2 and "names host 'relative'" in line and "file:///abs/path" in line and "./relative/lake" in line


@pytest.mark.integration
def test_lake_read_dropped_by_the_s3_server(monkeypatch, capsys, tmp_path, s3_endpoint, s3_proxy) -> None:
    """A lake read that fails below S3 (connection dropped, not an S3 error answer) is one line too."""
    import uuid

    from tests.support.services import create_bucket

    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    create_bucket(s3_endpoint, bucket)
    export = tmp_path / "export"
    export.mkdir()
    (export / "a.jsonl").write_text('{"id": "1", "author_id": "u", "text": "hi", "created_at": "2026-10-01T10:00:00Z"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"sources:\n  - {{name: arch, kind: archive, path: '{export}'}}\n")
    env = {"BRANDMON_CONFIG": str(cfg), "BRANDMON_STORAGE_URL": f"s3://{bucket}/lake",
           "BRANDMON_S3_ENDPOINT_URL": s3_proxy.url, "AWS_MAX_ATTEMPTS": "2"}
    assert _run(monkeypatch, capsys, tmp_path, ["db", "upgrade"], **env)[0] == 0
    rule = s3_proxy.fault("GET", r"/_index/manifest\.json$", kind="drop", times=100)
    code, err = _run(monkeypatch, capsys, tmp_path, ["ingest", "arch", "--start", "2026-10-01", "--end", "2026-10-02",
                                                     "--quiet"], **env)
    line = _one_clear_line(err)
    assert rule.fired == 2
    assert code == 2 and "S3 get on s3://" in line and "ConnectionClosedError" in line and "re-run" in line


def test_tensorflow_start_up_chatter_stays_off_a_users_terminal(tmp_path) -> None:
    """TensorFlow 2.21 prints absl/oneDNN banners from C++ while loading, before
    TF_CPP_MIN_LOG_LEVEL applies; the CLI hides them (and shows them at -vv)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRANDMON_", "TF_CPP"))}
    env["BRANDMON_HOME"] = str(tmp_path / "var")
    cmd = [sys.executable, "-m", "pipeline.cli"]
    subprocess.run([*cmd, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    quiet = subprocess.run([*cmd, "detect"], env=env, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert [line for line in quiet.stderr.splitlines() if line.strip()] == [
        line for line in quiet.stderr.splitlines() if line.startswith("brandmon: error:")
    ], quiet.stderr
    assert "no active model" in quiet.stderr
    # the control: a plain import prints the banners here, so the check above can fail
    loud = subprocess.run([sys.executable, "-c", "import tensorflow"], env={**env, "TF_CPP_MIN_LOG_LEVEL": "2"},
                          capture_output=True, text=True, timeout=300)
    assert "absl::InitializeLog" in loud.stderr or "oneDNN" in loud.stderr


@pytest.mark.parametrize("quiet", [False, True])
def test_backfill_off_a_terminal_logs_progress_unless_quiet(tmp_path, quiet: bool) -> None:
    """Off a terminal the CLI's progress is a log line now and then (README), shown at the
    default verbosity, not only with -v; `--quiet` shows none."""
    import os
    import subprocess
    import sys

    config = tmp_path / "brandmon.yaml"
    config.write_text('brands: [{name: Acme, keywords: [acme]}]\n'
                      'sources: [{name: syn, kind: synthetic, days: 2, start: "2026-10-01"}]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANDMON_")}
    env.update(BRANDMON_HOME=str(tmp_path / "var"), BRANDMON_CONFIG=str(config))
    run = [sys.executable, "-c", "import sys, pipeline.progress as p; p.LOG_EVERY_S = 0.0; "
           "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"]
    subprocess.run([*run, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    argv = ["backfill", "syn", "--start", "2026-10-01", "--end", "2026-10-02", *(["--quiet"] if quiet else [])]
    done = subprocess.run([*run, *argv], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "backfill syn: " in line]
    assert (lines == []) if quiet else ("backfill syn: 2 of 2 day" in lines[-1]), done.stderr
