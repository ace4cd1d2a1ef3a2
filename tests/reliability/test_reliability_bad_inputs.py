"""The bad-input corpus (tests/data/bad/cases.json) through the real ingest path.

Every case sits in a window that also holds good records; each must end as its manifest
says (a quarantine row with the reason, an image quarantined with the reason, a clear error,
or kept after sanitising), every good record must be kept, and no private target may see a
single request.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any
from urllib.parse import quote

import pytest
from rel_helpers import DAY, END, jpeg, load_cases, payload, private_targets, snapshot
from sqlalchemy import func, select

from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.errors import BrandmonError, ConfigError, InvalidKeyError
from pipeline.ingest.jobs import ingest_window
from pipeline.schema import brands, mention_daily, post_images, posts, quarantine, runs
from pipeline.settings import parse_config_document
from tests.support.feeds import (
    FakeBluesky,
    FakeMastodon,
    FakeReddit,
    Response,
    bluesky_post,
    mastodon_media,
    mastodon_status,
    reddit_post,
)

TAG = "/api/v1/timelines/tag/acme"
BRANDS = [{"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"]}]
GOOD = 20


def cfg(sources: list[dict[str, Any]], brands_: list[dict[str, Any]] | None = None, **network: Any) -> dict[str, Any]:
    net = {"max_retries": 2, "timeout_s": 3, "image_workers": 4, "per_host_connections": 4,
           "allowed_private_hosts": ["127.0.0.1"], "max_image_bytes": 200_000, **network}
    return {"brands": brands_ or BRANDS, "sources": sources, "network": net}


def good_rows(prefix: str = "good") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}-{i}", "author_id": f"g{i % 4}", "text": f"acme good record {i}",
             "created_at": (DAY + dt.timedelta(minutes=70 * i)).isoformat().replace("+00:00", "Z")} for i in range(GOOD)]


def posts_by_id(ctx: Any) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        return {r.external_id: r for r in conn.execute(select(posts))}


def quarantine_rows(ctx: Any) -> dict[str, str]:
    with ctx.engine.connect() as conn:
        return {r.record_ref: r.reason for r in conn.execute(select(quarantine.c.record_ref, quarantine.c.reason))}


def check_kept(post: Any, exp: dict[str, Any]) -> list[str]:
    bad = []
    if "text" in exp and post.text != exp["text"]:
        bad.append(f"text {post.text[:60]!r} != {exp['text']!r}")
    if "text_contains" in exp and exp["text_contains"] not in post.text:
        bad.append(f"text lacks {exp['text_contains']!r}")
    if "text_excludes" in exp and exp["text_excludes"] in post.text:
        bad.append(f"text still has {exp['text_excludes']!r}")
    if "lang" in exp and post.lang != exp["lang"]:
        bad.append(f"lang {post.lang!r}")
    return bad


def image_counts(ctx: Any) -> dict[str, int]:
    with ctx.engine.connect() as conn:
        q = select(posts.c.external_id, func.count(post_images.c.id)).outerjoin(post_images).group_by(posts.c.external_id)
        return dict(conn.execute(q).all())


# --- archive rows ----------------------------------------------------------------------------------


@pytest.fixture
def archive_ctx(make_ctx, backend, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    cases = load_cases("archive_row")
    for case in cases:
        ext = "csv" if case.get("payload", "").endswith(".csv") else "jsonl"
        (folder / f"{case['id']}.{ext}").write_bytes(payload(case))
    (folder / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good_rows()))
    ctx = make_ctx(cfg([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]), backend)
    return ctx, cases


def test_bad_archive_rows_quarantined_good_rows_kept(archive_ctx, tally):
    ctx, cases = archive_ctx
    counts = ingest_window(ctx, "arch", DAY, END)
    found, q = posts_by_id(ctx), quarantine_rows(ctx)
    problems: list[str] = []
    for case in cases:
        exp, cid = case["expect"], case["id"]
        refs = {ref: reason for ref, reason in q.items() if ref.startswith(f"{cid}.")}
        if "quarantine" in exp:
            if len(refs) != 1 or exp["quarantine"] not in next(iter(refs.values())):
                problems.append(f"{cid}: expected one quarantine row with {exp['quarantine']!r}, got {refs}")
                continue
            tally.bad_input("quarantined")
        elif "quarantine_refs" in exp:
            ok = all(ref in refs and want in refs[ref] for ref, want in exp["quarantine_refs"].items())
            ok = ok and len(refs) == len(exp["quarantine_refs"]) and all(k in found for k in exp["kept_ids"])
            if not ok:
                problems.append(f"{cid}: got {refs}")
                continue
            tally.bad_input("quarantined", len(refs))
            tally.bad_input("kept (sanitised)", len(exp["kept_ids"]))
        else:
            ext_id = exp.get("external_id") or str(json.loads(payload(case).decode("utf-8", "replace"))["id"])
            post = found.get(ext_id)
            if post is None or refs:
                problems.append(f"{cid}: expected post {ext_id!r} kept, quarantine {refs}")
                continue
            bad = check_kept(post, exp)
            if "images" in exp and image_counts(ctx).get(ext_id, 0) != exp["images"]:
                bad.append(f"{image_counts(ctx).get(ext_id, 0)} images")
            if bad:
                problems.append(f"{cid}: {bad}")
                continue
            tally.bad_input("kept (sanitised)")
    assert not problems, "\n".join(problems)
    for row in good_rows():  # every good record of the window is kept, verbatim
        assert found[row["id"]].text == row["text"]
    assert all("\x00" not in p.text and "\x00" not in p.external_id for p in found.values())
    assert counts["rejected"] == len(q)
    with ctx.engine.connect() as conn:
        assert conn.execute(select(runs.c.status)).scalar() == "succeeded"
    # Hostile rows do not break idempotence: a forced re-run changes nothing.
    tables = [posts, post_images, quarantine]
    before = snapshot(ctx, tables)
    again = ingest_window(ctx, "arch", DAY, END, force=True)
    assert again["new"] == again["updated"] == 0
    assert snapshot(ctx, tables) == before


# --- Mastodon statuses and pages -------------------------------------------------------------------


def masto_source(srv: FakeMastodon, **extra: Any) -> dict[str, Any]:
    return {"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme"], "limit": 10, "backoff_s": 0.01, **extra}


def good_statuses(n: int = GOOD) -> list[dict[str, Any]]:
    return [mastodon_status(DAY + dt.timedelta(minutes=65 * i), f"acme good status {i}", seq=i, tags=("acme",), account=f"good{i % 3}")
            for i in range(n)]


def test_bad_mastodon_statuses(make_ctx, backend, tally):
    cases = load_cases("mastodon_status")
    with FakeMastodon(max_limit=10) as srv:
        srv.statuses = good_statuses()
        ids = {}
        for k, case in enumerate(cases):
            status = mastodon_status(DAY + dt.timedelta(minutes=37 * k + 11), "acme bad status", seq=500 + k, tags=("acme",))
            status.update(json.loads(payload(case)))
            srv.statuses.append(status)
            ids[case["id"]] = status["id"]
        ctx = make_ctx(cfg([masto_source(srv)]), backend)
        ingest_window(ctx, "masto", DAY, END)
    found, q = posts_by_id(ctx), quarantine_rows(ctx)
    for case in cases:
        exp, sid = case["expect"], ids[case["id"]]
        if "quarantine" in exp:
            assert sid not in found and exp["quarantine"] in q.get(sid, ""), (case["id"], q.get(sid))
            tally.bad_input("quarantined")
        else:
            assert sid in found and sid not in q, case["id"]
            assert image_counts(ctx).get(sid, 0) == exp["images"]
            tally.bad_input("kept (sanitised)")
    assert {s["id"] for s in good_statuses()} <= set(found)


def merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base`; the nested `record` (Bluesky) / `data` (Reddit) merge one level down."""
    for key, value in override.items():
        if key in ("record", "data") and isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key].update(value)
        else:
            base[key] = value
    return base


@pytest.mark.parametrize("api", ["bluesky", "reddit"])
def test_bad_bluesky_and_reddit_records(make_ctx, backend, monkeypatch, tally, api):
    monkeypatch.setenv("REL_PW", "app-pass-1234")
    monkeypatch.setenv("REL_ID", "cid")
    monkeypatch.setenv("REL_SECRET", "csecret-1234")
    cases = load_cases(f"{api}_post" if api == "bluesky" else f"{api}_child")
    if api == "bluesky":
        fake = FakeBluesky(max_limit=10)
        good = [bluesky_post(DAY + dt.timedelta(minutes=60 * i), f"acme good {i}", did=f"did:plc:g{i % 3}", rkey=f"3kg{i:03d}") for i in range(GOOD)]
        bad = [merged(bluesky_post(DAY + dt.timedelta(minutes=47 * k + 13), "acme bad", did="did:plc:bad", rkey=f"3kb{k:03d}"),
                      json.loads(payload(c))) for k, c in enumerate(cases)]
        fake.posts = good + bad
        src = {"name": "s", "kind": "bluesky", "base_url": "{url}", "queries": ["acme"], "identifier": "brandmon.bsky.social",
               "password_env": "REL_PW", "limit": 10, "backoff_s": 0.01}
        ids = [p["uri"] for p in bad]
        good_ids = [p["uri"] for p in good]
    else:
        fake = FakeReddit(client_id="cid", client_secret="csecret-1234", max_limit=10)
        good = [reddit_post(DAY + dt.timedelta(minutes=60 * i), f"Acme good {i}", pid=f"g{i:02d}") for i in range(GOOD)]
        bad = [merged(reddit_post(DAY + dt.timedelta(minutes=47 * k + 13), "Acme bad", pid=f"b{k:02d}"), json.loads(payload(c)))
               for k, c in enumerate(cases)]
        fake.posts = good + bad
        src = {"name": "s", "kind": "reddit", "oauth_base_url": "{url}", "auth_url": "{url}/api/v1/access_token",
               "subreddits": ["brands"], "client_id_env": "REL_ID", "client_secret_env": "REL_SECRET", "limit": 10, "backoff_s": 0.01}
        ids = [f"b{k:02d}" for k in range(len(cases))]
        good_ids = [f"g{i:02d}" for i in range(GOOD)]
    with fake:
        src = {k: v.format(url=fake.url) if isinstance(v, str) else v for k, v in src.items()}
        ctx = make_ctx(cfg([src]), backend)
        ingest_window(ctx, "s", DAY, END)
    found, q = posts_by_id(ctx), quarantine_rows(ctx)
    problems = []
    for case, ext_id in zip(cases, ids, strict=True):
        exp = case["expect"]
        ref = f"t3_{ext_id}" if api == "reddit" else ext_id
        if "quarantine" in exp:
            if ext_id in found or exp["quarantine"] not in q.get(ref, ""):
                problems.append(f"{case['id']}: quarantine {q.get(ref)!r}, kept {ext_id in found}")
            else:
                tally.bad_input("quarantined")
        elif ext_id not in found or ref in q or ("images" in exp and image_counts(ctx).get(ext_id, 0) != exp["images"]):
            problems.append(f"{case['id']}: expected kept, quarantine {q.get(ref)!r}")
        else:
            tally.bad_input("kept (sanitised)")
    assert not problems, "\n".join(problems)
    assert set(good_ids) <= set(found)


class BadPageMastodon(FakeMastodon):
    """Answers the tag timeline with `bad` while it is set."""

    bad: Response | None = None

    def _dispatch(self, req):  # type: ignore[no-untyped-def]
        if self.bad is not None and req.path.startswith(TAG):
            return Response(self.bad.status, self.bad.body, dict(self.bad.headers))
        return super()._dispatch(req)


@pytest.mark.parametrize("case", load_cases("feed_page"), ids=lambda c: c["id"])
def test_bad_feed_pages_fail_cleanly_then_rerun_completes(make_ctx, backend, case, tally):
    with BadPageMastodon(max_limit=10) as srv:
        srv.statuses = good_statuses()
        if case.get("fault"):
            srv.fault(TAG, case["fault"], times=1000)
        else:
            body = case["body"]
            srv.bad = Response(200, body if isinstance(body, str) else body, {"Content-Type": case["content_type"]})
        ctx = make_ctx(cfg([masto_source(srv)]), backend)
        with pytest.raises(BrandmonError, match=case["expect"]["error"]) as info:
            ingest_window(ctx, "masto", DAY, END)
        assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
        assert posts_by_id(ctx) == {}  # no half window
        with ctx.engine.connect() as conn:
            status, error = conn.execute(select(runs.c.status, runs.c.error)).one()
        assert status == "failed" and case["expect"]["error"] in error
        tally.bad_input("clear error")
        srv.bad = None
        srv.clear_faults()
        assert ingest_window(ctx, "masto", DAY, END)["new"] == GOOD


# --- images and URLs -------------------------------------------------------------------------------


@pytest.mark.integration
def test_bad_images_and_private_urls(make_ctx, backend, tally):
    img_cases, url_cases, redir_cases = load_cases("image"), load_cases("url"), load_cases("redirect")
    with FakeMastodon(max_limit=20) as srv, private_targets() as targets:
        ports = {k: t.port for k, t in targets.items()} | {"allowed_host": f"127.0.0.1:{srv.port}"}
        srv.statuses = good_statuses()
        good_urls = []
        for i, st in enumerate(srv.statuses):
            good_urls.append(srv.add_bytes(f"/good/{i}.jpg", jpeg(i)))
            st["media_attachments"] = [mastodon_media(good_urls[-1])]
        srv.add_bytes("/img/good.jpg", jpeg(99))
        wanted: dict[str, tuple[dict[str, Any], str]] = {}
        for case in img_cases:
            path = f"/bad/{case['id']}"
            if case.get("generate") != "not_found":
                srv.add_bytes(path, payload(case), case["content_type"])
            wanted[srv.url + path] = (case, "")
        for case in url_cases:
            wanted[case["url"].format(**ports)] = (case, "")
        for case in redir_cases:
            base = f"/redir/{case['id']}"
            if case["target"] == "loop":
                srv.add_redirect(f"{base}/0", f"{srv.url}{base}/0")
            else:
                hops = case["hops"]
                for h in range(hops - 1):
                    srv.add_redirect(f"{base}/{h}", f"{srv.url}{base}/{h + 1}")
                srv.add_redirect(f"{base}/{hops - 1}", case["target"].format(**ports))
            wanted[f"{srv.url}{base}/0"] = (case, "")
        for k, url in enumerate(wanted):
            srv.statuses.append(mastodon_status(DAY + dt.timedelta(minutes=13 * k + 7), "acme with a bad image", seq=1000 + k,
                                                tags=("acme",), media=[mastodon_media(url)]))
        ctx = make_ctx(cfg([masto_source(srv)]), backend)
        counts = ingest_window(ctx, "masto", DAY, END)
        with ctx.engine.connect() as conn:
            rows = {r.url: (r.status, r.reason or "") for r in conn.execute(select(post_images.c.url, post_images.c.status, post_images.c.reason))}
        problems = []
        for url, (case, _) in wanted.items():
            exp = case["expect"]
            got = rows.get(url)
            if got is None or got[0] != exp["image"] or exp["reason"] not in got[1]:
                problems.append(f"{case['id']}: {url} -> {got}, expected {exp}")
            else:
                tally.bad_input("image quarantined" if got[0] == "quarantined" else "image failed (retryable)")
        assert not problems, "\n".join(problems)
        assert all(rows[u] == ("stored", "") for u in good_urls)  # every good image kept
        assert counts["new"] == len(srv.statuses)
        hits = {k: list(t.hits) for k, t in targets.items()}
    assert hits == {"p4": [], "p1": [], "p6": []}, f"a private address was fetched: {hits}"
    stored = [k for k in ctx.store.list("images/")]
    assert len(stored) == GOOD


# --- brand names and hashtags ----------------------------------------------------------------------


def test_hostile_brand_names_counted_verbatim(make_ctx, backend, tmp_path, tally):
    cases = load_cases("brand")
    folder = tmp_path / "export"
    folder.mkdir()
    rows = good_rows()
    for k, case in enumerate(cases):
        rows.append({"id": f"brand-{k}", "author_id": "b", "text": case["text"], "created_at": "2026-10-02T09:00:00Z"})
    (folder / "posts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = make_ctx(cfg([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}],
                       brands_=BRANDS + [c["brand"] for c in cases]), backend)
    ingest_window(ctx, "arch", DAY, END)
    aggregate_dirty(ctx)
    with ctx.engine.connect() as conn:
        names = {n for (n,) in conn.execute(select(brands.c.name))}
        counted = {
            (b, s): p for b, s, p in conn.execute(
                select(mention_daily.c.brand, mention_daily.c.source, mention_daily.c.posts)
                .where(mention_daily.c.day == DAY.date(), mention_daily.c.product == "*", mention_daily.c.platform == "*")
            )
        }
        assert conn.execute(select(func.count()).select_from(posts)).scalar() == len(rows)
    for case in cases:
        name = case["brand"]["name"]
        assert name in names, case["id"]
        assert counted[(name, "text")] == case["expect"]["counted"], (case["id"], counted.get((name, "text")))
        tally.bad_input("stored verbatim")
    assert counted[("Acme", "text")] == GOOD


def test_hostile_hashtags_are_quoted_in_requests(make_ctx, backend, tally):
    cases = load_cases("hashtag")
    with FakeMastodon() as srv:
        srv.statuses = good_statuses(5)
        ctx = make_ctx(cfg([masto_source(srv, hashtags=[c["hashtag"] for c in cases] + ["acme"])]), backend)
        counts = ingest_window(ctx, "masto", DAY, END)
        paths = {r.path for r in srv.requests}
    assert counts["new"] == 5
    for case in cases:
        quoted = "/api/v1/timelines/tag/" + quote(case["hashtag"], safe="")
        assert quoted in paths, (case["id"], paths)
        assert all(ch not in quoted[len("/api/v1/timelines/tag/"):] for ch in "/?#$`;'| ")
        tally.bad_input("quoted")


# --- object keys -----------------------------------------------------------------------------------


def test_object_keys_cannot_escape_the_lake(make_ctx, backend, tmp_path, tally):
    ctx = make_ctx(None, backend)
    store = ctx.store
    for case in load_cases("object_key"):
        key = case["key"]
        for op in (lambda k: store.put(k, b"x"), store.get, store.exists, store.delete):
            with pytest.raises(InvalidKeyError):
                op(key)
        tally.bad_input("refused (InvalidKeyError)")
    for case in load_cases("object_key_list"):
        try:
            listed = list(store.list(case["key"]))
        except InvalidKeyError:
            listed = []
        assert listed == []
        tally.bad_input("refused (InvalidKeyError)")
    for case in load_cases("source_name"):
        with pytest.raises(ConfigError, match=case["expect"]["error"].replace("[", r"\[").replace("]", r"\]")):
            parse_config_document({"sources": [{"name": case["name"], "kind": "archive", "path": "/x"}]})
        tally.bad_input("clear error")
    assert not list(tmp_path.rglob("outside.txt")) and not list(tmp_path.rglob("brandmon-outside.txt"))
    assert list(store.list("")) == []
    if backend == "postgres":
        import boto3

        bucket = ctx.settings.storage_url.split("/")[2]
        objs = boto3.client("s3", endpoint_url=ctx.settings.s3_endpoint_url).list_objects_v2(Bucket=bucket).get("Contents", [])
        assert objs == []


def test_corpus_is_complete_and_every_case_is_used(tally):
    cases = load_cases()
    handled = {"archive_row", "mastodon_status", "bluesky_post", "reddit_child", "feed_page", "image", "url", "redirect",
               "brand", "hashtag", "object_key", "object_key_list", "source_name"}
    assert len(cases) >= 50
    assert {c["kind"] for c in cases} <= handled
    assert len({c["id"] for c in cases}) == len(cases)
    for c in cases:
        assert c["note"] and c["expect"], c["id"]
        if "payload" in c:
            assert payload(c) is not None
