"""The progress callback: silent by default, a tqdm bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import logging

from pipeline import progress as prog


def test_silent_is_the_default_and_reports_nothing(capsys):
    tracker = prog.of(None)(10, "work", "img")
    tracker.update(5)
    tracker.note(rows=3)
    tracker.close()
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert prog.of(prog.terminal) is prog.terminal
    assert prog.for_cli(True) is prog.silent and prog.for_cli(False) is prog.terminal


def test_terminal_off_a_tty_logs_counts_with_total_and_notes(monkeypatch, caplog):
    monkeypatch.setattr(prog, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="pipeline.progress")
    with prog.terminal(2000, "detect v1", "img") as tracker:
        assert tracker.bar is None  # pytest's stderr is not a terminal
        tracker.note(batch=3)
        tracker.update(1500)
    assert "detect v1: 1,500 of 2,000 img, batch 3" in caplog.text
