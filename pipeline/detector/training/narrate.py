"""One line of run narration: always logged, and on stderr when the caller asked for progress."""

from __future__ import annotations

import logging
import sys

from pipeline.progress import Progress, silent

log = logging.getLogger("pipeline.detector.train")


def say(progress: Progress | None, message: str, level: int = logging.INFO) -> None:
    """Log `message`; print it too when `progress` shows anything (the bar's companion)."""
    log.log(level, message)
    if progress is not None and progress is not silent:
        print(message if level < logging.WARNING else f"warning: {message}", file=sys.stderr, flush=True)
