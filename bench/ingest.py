"""Benchmark: backfill N archive posts into Postgres, against a naive ORM insert in the same run.

    nice -n 5 .venv/bin/python bench/ingest.py [--posts 1000000] [--days 100] [--sample 50000] [--workers 2]
        [--database-url postgresql+psycopg2://...]   (else BRANDMON_TEST_PG_URL, else a throwaway cluster)

What is timed:
- brandmon: `pipeline.ingest.jobs.backfill` over daily windows of an archive source (gzip
  JSONL export, 20% of posts with an image URL; image download off): indexing the export
  into day partitions of the raw lake, normalising, COPY + set-based upsert, image rows,
  dirty days, run log. End to end, from the export file to committed rows.
- baseline: the same posts (already parsed and normalised, so only the insert is timed)
  inserted as ORM objects with `session.add_all` + commit, on a sample, into a fresh database.
- reference: a raw COPY of the same sample rows into an unindexed table (the ceiling).
Each part prints wall-clock rows/s and, because the 2 cores are shared with other work, the
CPU seconds it used (this process + workers, and the Postgres server when the cluster is the
throwaway one): rows per CPU-second compare code, not the neighbours' load. The load average
at start and end is printed too. A scratch database is created for each part and dropped after.
Results of a run: bench/results/ingest.txt.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

from sqlalchemy import func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.context import Context  # noqa: E402
from pipeline.database import upgrade  # noqa: E402
from pipeline.ingest.jobs import backfill  # noqa: E402
from pipeline.progress import terminal  # noqa: E402
from pipeline.schema import post_images, posts  # noqa: E402
from pipeline.settings import load_settings  # noqa: E402
from pipeline.sources.archive.parse import parse_row  # noqa: E402
from tests.support.services import PostgresCluster, create_database, drop_database  # noqa: E402

WORDS = ("acme", "globex", "initech", "love", "new", "today", "shop", "price", "great", "bad", "support", "launch",
         "store", "phone", "coffee", "shoes", "sale", "review", "unboxing", "why", "does", "my", "the", "a", "is")


class Meter:
    """Wall time and CPU seconds of a timed section: this process + its reaped children
    (backfill workers), and the Postgres server's processes when the cluster is ours.

    Why CPU too: the machine's 2 cores are shared, so wall-clock rates swing with other
    people's load; CPU seconds per post (client + server) is what our code costs."""

    def __init__(self, pg_data: Path | None) -> None:
        self.pg_data = pg_data

    def _server(self) -> float | None:
        if self.pg_data is None:
            return None
        try:
            pid = int((self.pg_data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields[0] is field 3 (state): ppid = fields[1], utime..cstime = fields[11:15]
            if stat.parent.name == str(pid):
                total += sum(int(f) for f in fields[11:15]) / tick  # + exited backends (cutime, cstime)
            elif fields[1] == str(pid):
                total += sum(int(f) for f in fields[11:13]) / tick
        return total

    def _client(self) -> float:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return time.process_time() + kids.ru_utime + kids.ru_stime

    def __enter__(self) -> Meter:
        self.wall, self.client, self.server = time.perf_counter(), self._client(), self._server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.client = self._client() - self.client
        after = self._server()
        self.server = after - self.server if after is not None and self.server is not None else None

    def cpu_text(self, n: int) -> str:
        if self.server is None:
            return f"CPU {self.client:.1f}s client (server not measured) = {self.client / n * 1e6:.0f} us/post client"
        cpu = self.client + self.server
        return (f"CPU {self.client:.1f}s client + {self.server:.1f}s Postgres = {cpu / n * 1e6:.0f} us/row "
                f"= {n / cpu:,.0f} rows per CPU-second")


def generate(path: Path, n: int, days: int, start: dt.date, seed: int = 1) -> None:
    """An export of n posts spread over `days` days, in the archive dict shape, gzip JSONL."""
    rnd = random.Random(seed)
    t0 = dt.datetime.combine(start, dt.time(), dt.UTC).timestamp()
    span = days * 86400
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as fh:
        for i in range(n):
            ts = t0 + (i * span) // n + rnd.random()
            created = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            text_ = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(6, 30)))
            images = [{"url": f"https://images.example/{i}.jpg", "alt": "photo"}] if i % 5 == 0 else []
            fh.write(json.dumps({
                "id": str(10_000_000 + i), "platform": "mastodon", "author_id": f"user{rnd.randint(0, 50_000)}",
                "text": text_, "lang": "en", "created_at": created, "url": f"https://social.example/@u/{i}",
                "images": images, "reblog_of": str(10_000_000 + i - 1) if i % 17 == 0 and i else None,
            }) + "\n")


def scratch_db(admin_url: str, tag: str) -> tuple[str, str]:
    name = f"bench_{tag}_{uuid.uuid4().hex[:8]}"
    return create_database(admin_url, name), name


def make_ctx(workdir: Path, db_url: str, archive: Path) -> Context:
    cfg = workdir / "brandmon.yaml"
    cfg.write_text(json.dumps({"sources": [{"name": "bench", "kind": "archive", "path": str(archive), "fetch_images": False}]}))
    env = {"BRANDMON_HOME": str(workdir / "var"), "BRANDMON_DATABASE_URL": db_url, "BRANDMON_STORAGE_URL": (workdir / "lake").as_uri(),
           "BRANDMON_CONFIG": str(cfg), "BRANDMON_AUTHOR_SALT": "bench-salt"}
    ctx = Context(load_settings(env=env))
    upgrade(ctx.engine)
    return ctx


def sample_posts(archive: Path, n: int) -> list:
    from pipeline.sources.parsing import Normalizer

    norm = Normalizer("bench-salt", default_platform="archive")
    out = []
    with gzip.open(archive, "rt", encoding="utf-8") as fh:
        for line in fh:
            out.append(parse_row(norm, json.loads(line)))
            if len(out) >= n:
                break
    return out


def orm_baseline(db_url: str, sample: list, meter: Meter) -> Meter:
    """Naive ORM: one mapped object per post (and per image), session.add_all, commit."""
    from sqlalchemy.orm import Session, registry

    from pipeline.ingest.loader import content_hash

    class PostRow:
        pass

    class ImageRow:
        pass

    reg = registry()
    reg.map_imperatively(PostRow, posts)
    reg.map_imperatively(ImageRow, post_images)
    engine = Context(load_settings(env={"BRANDMON_DATABASE_URL": db_url, "BRANDMON_AUTHOR_SALT": "x", "BRANDMON_HOME": tempfile.gettempdir()})).engine
    upgrade(engine)
    now = dt.datetime.now(dt.UTC)
    with meter, Session(engine) as session:
        objs = []
        for p in sample:
            row = PostRow()
            row.platform, row.external_id, row.source, row.author_hash = p.platform, p.external_id, "bench", p.author_hash
            row.text, row.lang, row.posted_at, row.url, row.repost_of = p.text, p.lang, p.posted_at, p.url, p.repost_of
            row.content_hash, row.raw_key, row.ingested_at, row.updated_at = content_hash(p), None, now, now
            objs.append(row)
        session.add_all(objs)
        session.flush()
        images = []
        for row, p in zip(objs, sample, strict=True):
            for i, img in enumerate(p.images):
                im = ImageRow()
                im.post_id, im.position, im.url, im.alt_text, im.status, im.attempts, im.updated_at = row.id, i, img.url, img.alt_text, "pending", 0, now
                images.append(im)
        session.add_all(images)
        session.commit()
    engine.dispose()
    return meter


def copy_reference(db_url: str, sample: list, meter: Meter) -> Meter:
    from pipeline.database import copy_rows, make_engine

    engine = make_engine(db_url)
    rows = [(p.platform, p.external_id, p.author_hash, p.text, p.lang, p.posted_at, p.url) for p in sample]
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE copy_ref (platform text, external_id text, author_hash text, text text, lang text, posted_at timestamptz, url text)"))
    with meter, engine.begin() as conn:
        copy_rows(conn, "copy_ref", ["platform", "external_id", "author_hash", "text", "lang", "posted_at", "url"], rows)
    engine.dispose()
    return meter


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=100, help="days the posts span (one backfill window per day)")
    ap.add_argument("--sample", type=int, default=50_000, help="posts in the ORM baseline sample")
    ap.add_argument("--workers", type=int, default=2, help="backfill worker processes (default 2: one per core here)")
    ap.add_argument("--database-url", default=os.environ.get("BRANDMON_TEST_PG_URL"), help="a Postgres server URL (a scratch database is created on it)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the export and lake go (default: a temp dir, removed after)")
    args = ap.parse_args(argv)

    load0 = os.getloadavg()
    cluster = None
    if args.database_url:
        admin = args.database_url
        if not admin.startswith("postgresql"):
            ap.error("--database-url must be a Postgres URL")
    else:
        print("starting a throwaway Postgres cluster ...", flush=True)
        cluster = PostgresCluster().start()
        admin = cluster.url
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="brandmon-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    created: list[str] = []
    try:
        archive_dir = workdir / "export"
        archive_dir.mkdir(exist_ok=True)
        archive = archive_dir / "posts.jsonl.gz"
        start = dt.date(2026, 1, 1)
        t = time.perf_counter()
        generate(archive, args.posts, args.days, start)
        print(f"generated {args.posts:,} posts over {args.days} days ({archive.stat().st_size / 1e6:.0f} MB gzip) in {time.perf_counter() - t:.0f}s", flush=True)

        db_url, name = scratch_db(admin, "ingest")
        created.append(name)
        ctx = make_ctx(workdir, db_url, archive_dir)
        pg_data = cluster.data if cluster is not None else None
        with Meter(pg_data) as bm:
            counts = backfill(ctx, "bench", start, start + dt.timedelta(days=args.days - 1), progress=terminal if sys.stderr.isatty() else None, workers=args.workers)
        with ctx.engine.connect() as conn:
            n_posts = conn.execute(select(func.count()).select_from(posts)).scalar()
            n_images = conn.execute(select(func.count()).select_from(post_images)).scalar()
        ctx.close()
        assert n_posts == args.posts == counts["new"], (n_posts, counts)
        brandmon_rate = args.posts / bm.wall
        print(f"brandmon backfill ({args.workers} worker{'s' if args.workers > 1 else ''}): {args.posts:,} posts (+{n_images:,} image rows) "
              f"in {bm.wall:.1f}s = {brandmon_rate:,.0f} posts/s end to end; {bm.cpu_text(args.posts)}", flush=True)

        sample = sample_posts(archive, min(args.sample, args.posts))
        orm_url, name = scratch_db(admin, "orm")
        created.append(name)
        om = orm_baseline(orm_url, sample, Meter(pg_data))
        orm_rate = len(sample) / om.wall
        print(f"naive ORM add_all: {len(sample):,} posts in {om.wall:.1f}s = {orm_rate:,.0f} posts/s (insert only, parsing not timed); "
              f"{om.cpu_text(len(sample))}", flush=True)
        copy_url, name = scratch_db(admin, "copy")
        created.append(name)
        cm = copy_reference(copy_url, sample, Meter(pg_data))
        copy_rate = len(sample) / cm.wall
        print(f"reference raw COPY (unindexed table): {len(sample):,} rows in {cm.wall:.1f}s = {copy_rate:,.0f} rows/s; "
              f"{cm.cpu_text(len(sample))}", flush=True)
        print(f"ratio brandmon / ORM: {brandmon_rate / orm_rate:.1f}x   brandmon / raw COPY: {brandmon_rate / copy_rate:.2f}   "
              f"(target >= 50,000 posts/s: {'met' if brandmon_rate >= 50_000 else 'NOT met'})")
        if bm.server is not None and om.server is not None:
            per_cpu = args.posts / (bm.client + bm.server)
            orm_cpu = len(sample) / (om.client + om.server)
            print(f"per CPU-second (client + server): brandmon {per_cpu:,.0f} posts, ORM {orm_cpu:,.0f} posts = {per_cpu / orm_cpu:.1f}x; "
                  f"on {os.cpu_count()} otherwise idle cores that is up to ~{per_cpu * (os.cpu_count() or 1):,.0f} posts/s")
        print(f"load average (1, 5, 15 min) at start {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, at end "
              "{:.2f} {:.2f} {:.2f}; {} cores; run with nice".format(*os.getloadavg(), os.cpu_count()))
    finally:
        for name in created:
            try:
                drop_database(admin, name)
            except Exception as exc:  # keep going: the cluster is removed anyway
                print(f"could not drop {name}: {exc}", file=sys.stderr)
        if cluster is not None:
            cluster.stop()
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
