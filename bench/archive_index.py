"""Benchmark: the archive index (reading a gzip JSONL export into day partitions), rows/s,
against reading the same file without parsing (gunzip + line split) in the same run.

    nice -n 5 .venv/bin/python bench/archive_index.py [--posts 300000] [--days 30] [--repeat 3]

What is timed: `ArchiveConnector._index_files` over one export file shaped like
bench/ingest.py's (gunzip on the read-ahead thread, each row's posted time read, the row
written to its day's gzip partition in memory); wall time and CPU seconds of all threads (the
2 cores are shared: rows per CPU-second compare code, not the neighbours' load). The floor: `file_blocks` + `iter_json_lines`
over the same file (every byte gunzipped and split into lines, nothing parsed). The ratio
index / floor compares code, not the machine's load. Best of `--repeat` runs each.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ingest import generate  # noqa: E402

from pipeline.settings import NetworkConfig, SourceConfig  # noqa: E402
from pipeline.sources.archive.connector import ArchiveConnector  # noqa: E402
from pipeline.sources.archive.files import file_blocks, iter_json_lines, read_ahead  # noqa: E402

CPU: list[float] = []  # CPU seconds (all threads) of each index run


def index_once(path: Path) -> tuple[float, int]:
    source = SourceConfig(name="bench", kind="archive", options={"path": str(path), "fetch_images": False})
    conn = ArchiveConnector(source, NetworkConfig())
    listing = conn.files.list()
    days: dict = {}
    rejects: list = []
    pool = ThreadPoolExecutor(max_workers=1)
    t0, c0 = time.perf_counter(), time.process_time()
    rows = conn.index._index_files(listing, days, rejects, dt.datetime.now(dt.UTC), pool)
    for writer in days.values():
        writer.finish()
    took = time.perf_counter() - t0
    CPU.append(time.process_time() - c0)
    pool.shutdown()
    assert not rejects, rejects[:3]
    return took, rows


def floor_once(path: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    with open(path, "rb") as raw:
        n = sum(1 for _ in iter_json_lines(read_ahead(file_blocks(raw, True, [0]))))
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--posts", type=int, default=300_000)
    ap.add_argument("--days", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "export.jsonl.gz"
        generate(path, args.posts, args.days, dt.date(2026, 1, 1))
        index = min(index_once(path) for _ in range(args.repeat))
        floor = min(floor_once(path) for _ in range(args.repeat))
    assert index[1] == floor[1] == args.posts
    print(f"archive index: {args.posts:,} rows in {index[0]:.2f}s = {args.posts / index[0]:,.0f} rows/s; "
          f"best CPU {min(CPU):.2f}s = {args.posts / min(CPU):,.0f} rows per CPU-second")
    print(f"floor (gunzip + split lines only): {floor[0]:.2f}s = {args.posts / floor[0]:,.0f} rows/s")
    print(f"ratio index / floor: {floor[0] / index[0]:.2f}")


if __name__ == "__main__":
    main()
