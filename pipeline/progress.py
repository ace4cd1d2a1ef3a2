"""Progress reporting is the caller's business.

Jobs never decide how progress is shown: they take a `Progress` (a factory of trackers) and
report through it. The CLI passes `terminal` (a tqdm bar on a terminal, a log line now and then
elsewhere), Airflow tasks and tests pass nothing (`silent`), a notebook may pass its own.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  # off a terminal, a line at most this often so long work never looks hung


class Tracker(Protocol):
    """One unit of long work: `update(n)` as items finish, `note(...)` for a short status."""

    def update(self, n: int = 1) -> None: ...

    def note(self, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    """A factory of trackers: `progress(total, desc, unit)`; total may be None (unknown)."""

    def __call__(self, total: int | None, desc: str, unit: str = "it") -> Tracker: ...


class _Silent:
    """Counts nothing, shows nothing: the default for library calls, tasks and tests."""

    def update(self, n: int = 1) -> None:
        pass

    def note(self, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def silent(total: int | None, desc: str, unit: str = "it") -> Tracker:
    """The `Progress` that reports nothing."""
    return _Silent()


class _Terminal:
    """A tqdm bar when stderr is a terminal; otherwise an INFO line every `LOG_EVERY_S` seconds."""

    def __init__(self, total: int | None, desc: str, unit: str, every_s: float) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = 0
        self.fields: dict[str, Any] = {}
        self._next = time.monotonic() + every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False,
                            unit_scale=unit == "B")

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            of = f" of {self.total:,}" if self.total is not None else ""
            extra = "".join(f", {k} {v}" for k, v in self.fields.items())
            log.info("%s: %s%s %s%s", self.desc, f"{self.done:,}", of, self.unit, extra)

    def note(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self.bar is not None:
            self.bar.set_postfix(refresh=False, **{k: str(v) for k, v in fields.items()})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> _Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def terminal(total: int | None, desc: str, unit: str = "it") -> Tracker:
    """The command line's `Progress`: a bar on a terminal, periodic log lines elsewhere."""
    return _Terminal(total, desc, unit, LOG_EVERY_S)


def of(progress: Progress | None) -> Progress:
    """`progress`, or `silent` when the caller passed none."""
    return silent if progress is None else progress


def for_cli(quiet: bool) -> Progress:
    """What a command's `--quiet` flag asks for."""
    return silent if quiet else terminal
