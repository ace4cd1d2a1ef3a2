"""The PNG charts' common frame: one 9-inch axes saved as PNG, and the daily-posts chart that
`brandmon trends`, the report and `brandmon forecast` draw on (bars of posts, a title taken
as plain text, the legend top left)."""

from __future__ import annotations

import datetime as dt
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

POSTS_COLOR = "#9fb7d9"  # the bars of daily posts
LINE_COLOR = "#1f4e8c"  # the main line (rolling mean, forecast, mentions)


@contextmanager
def png_axes(path: str | Path | io.BytesIO, height: float = 3.2) -> Iterator[Any]:
    """Axes to draw on; on exit, date labels slanted, the layout tightened and the PNG written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    yield ax
    fig.autofmt_xdate()
    fig.tight_layout()
    fig.savefig(path, format="png")


@contextmanager
def posts_chart(path: str | Path | io.BytesIO, days: Sequence[dt.date], posts: Sequence[float],
                title: str) -> Iterator[Any]:
    """Daily posts as bars; the caller adds its lines, then title, grid and legend follow."""
    with png_axes(path) as ax:
        ax.bar(days, posts, color=POSTS_COLOR, label="posts", width=0.8)
        yield ax
        # parse_math=False: a brand named `$Acme$` or `a$b$c` is a name, not matplotlib mathtext
        ax.set_title(title, fontsize=11, parse_math=False)
        ax.set_ylabel("posts")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
