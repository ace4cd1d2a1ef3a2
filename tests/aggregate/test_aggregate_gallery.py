"""The photos behind the counts: the report gallery, its thumbnails, `brandmon evidence`, and the
report opened in a real headless Chromium (images load, boxes drawn, links point to the posts)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from agg_helpers import CONFIG, FakePost, add_detections, add_model, add_posts, sha, ts
from PIL import Image, ImageDraw
from sqlalchemy import insert, update

from pipeline.aggregate.gallery import day_evidence, make_thumbnail, thumb_key, valid_box
from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.aggregate.report import render_report, write_report
from pipeline.cli import main
from pipeline.schema import detections, images, posts, review_queue

DAY = dt.date(2026, 10, 12)
W, H = 640, 480
BOX_A = [100, 120, 300, 260]
BOX_D = [380, 40, 600, 200]


def _jpeg(color: tuple[int, int, int], box: list[int] | None) -> bytes:
    img = Image.new("RGB", (W, H), (235, 235, 225))
    if box:
        ImageDraw.Draw(img).rectangle(box, fill=color)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def gallery_ctx(make_ctx, backend: str = "sqlite"):
    """Acme: A (0.92, box) in two posts, B (0.81, no box), C (0.45, in review); Globex: D (0.95, box);
    E: Acme at 0.3, below threshold and not queued (never shown)."""
    ctx = make_ctx(CONFIG, backend)
    rows = [
        FakePost(1, "p1", ts(DAY, 9), "look", platform="mastodon", images=["A"]),
        FakePost(2, "p2", ts(DAY, 10), "again", platform="bluesky", images=["A"]),
        FakePost(3, "p3", ts(DAY, 11), "nice", platform="reddit", images=["B", "C"]),
        FakePost(4, "p4", ts(DAY, 12), "hmm", platform="mastodon", images=["D", "E"]),
        FakePost(5, "p5", ts(DAY - dt.timedelta(days=1), 12), "old", images=["F"]),  # another day
    ]
    with ctx.engine.begin() as conn:
        add_model(conn, threshold=0.5)
        add_posts(conn, rows)
        add_detections(conn, [("A", "Acme", 0.92), ("B", "Acme", 0.81), ("C", "Acme", 0.45), ("D", "Globex", 0.95),
                              ("E", "Acme", 0.3), ("F", "Acme", 0.99)])
        for name, box in (("A", BOX_A), ("D", BOX_D), ("C", [10, 10, 90, 90])):
            conn.execute(update(detections).where(detections.c.image_sha256 == sha(name)).values(box=box))
        conn.execute(insert(review_queue).values(image_sha256=sha("C"), model_version="m1", class_name="Acme",
                                                 score=0.45, status="pending"))
        for p in rows:
            url = "javascript:alert(1)" if p.id == 4 else f"https://social.example/@u/{p.external_id}"
            conn.execute(update(posts).where(posts.c.id == p.id).values(url=url))
        for name, color, box in (("A", (30, 30, 200), BOX_A), ("B", (30, 30, 200), [200, 200, 400, 400]),
                                 ("C", (30, 160, 30), None), ("D", (120, 30, 160), BOX_D), ("E", (0, 0, 0), None),
                                 ("F", (0, 0, 0), None)):
            data = _jpeg(color, box)
            ctx.store.put(f"images/{sha(name)}", data)
            conn.execute(update(images).where(images.c.sha256 == sha(name)).values(width=W, height=H, size_bytes=len(data)))
    aggregate_dirty(ctx)  # fills logo_class_map from the active model's classes
    return ctx


def test_day_evidence_picks_counted_then_review(make_ctx, backend):
    ctx = gallery_ctx(make_ctx, backend)
    acme = day_evidence(ctx, "Acme", DAY)
    assert [(e.kind, e.sha256) for e in acme] == [("counted", sha("A")), ("counted", sha("B")), ("review", sha("C"))]
    a, b, c = acme
    assert a.box == BOX_A and a.posts_that_day == 2 and a.platform == "mastodon"  # the earliest post links
    assert a.post_url == "https://social.example/@u/p1" and a.review_status == "counted"
    assert b.box is None and b.score == pytest.approx(0.81)
    assert c.review_status == "pending" and c.score == pytest.approx(0.45) and c.box == [10, 10, 90, 90]
    assert [e.sha256 for e in day_evidence(ctx, "Globex", DAY)] == [sha("D")]
    assert day_evidence(ctx, "Initech", DAY) == []
    assert [e.sha256 for e in day_evidence(ctx, "Acme", DAY, top=1, top_review=0)] == [sha("A")]


def test_valid_box_rejects_nonsense():
    assert valid_box([1, 2, 3, 4], 10, 10) == [1, 2, 3, 4]
    for bad in (None, [1, 2, 3], [5, 5, 2, 9], [0, 0, 20, 5], ["a", 1, 2, 3], {"x": 1}):
        assert valid_box(bad, 10, 10) is None


def test_thumbnails_made_once_and_decode_bounded(make_ctx):
    ctx = gallery_ctx(make_ctx)
    page = render_report(ctx, DAY)
    key = thumb_key(sha("A"))
    first = ctx.store.get(key)
    assert Image.open(io.BytesIO(first)).size == (320, 240)
    ctx.store.delete(f"images/{sha('A')}")  # the original gone: the stored thumbnail still serves
    again = render_report(ctx, DAY)
    assert ctx.store.get(key) == first
    b64 = re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", again)
    assert len(b64) == len(re.findall(r"data:image/jpeg;base64,", page)) == 4  # A, B, C (review), D
    # A PNG claiming 100000 x 100000 pixels is refused before decoding.
    bomb = io.BytesIO()
    Image.new("L", (1, 1)).save(bomb, "PNG")
    data = bytearray(bomb.getvalue())
    data[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width, height (CRC now wrong: never reached)
    with pytest.raises(ValueError, match="not thumbnailed|bomb|undecodable"):
        make_thumbnail(bytes(data))
    with pytest.raises(ValueError, match="undecodable"):
        make_thumbnail(b"\xff\xd8\xff\xe0 not a jpeg")


def test_report_gallery_html(make_ctx):
    ctx = gallery_ctx(make_ctx)
    page = render_report(ctx, DAY)
    assert "javascript:" not in page  # the data's bad link is dropped, the photo still shown
    assert page.count("<svg class='box'") == 3  # A, D, and C's matcher box; B has none
    assert "no box: the classifier alone called it" in page
    assert "review: pending" in page and "in 2 posts" in page
    assert re.search(r"\bsrc=['\"](?!data:)", page) is None  # every src is inline: no external request
    assert sha("E") not in page and sha("F") not in page


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("Debian package `chromium` is required for the report browser test (apt-get install chromium)")
    return exe


def _run_chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.iterdir()))}"
    profile.mkdir()
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           "--host-resolver-rules=MAP * ~NOTFOUND",  # any network request would fail: the page needs none
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


CHECK = """
<script>
window.addEventListener('load', () => {
  const figs = [...document.querySelectorAll('section.gallery figure')];
  const out = figs.map(f => {
    const img = f.querySelector('img.thumb'), rect = f.querySelector('svg.box rect'), a = f.querySelector('a.post');
    const ir = img.getBoundingClientRect();
    const br = rect ? rect.getBoundingClientRect() : null;
    return {sha: f.dataset.sha256, kind: f.className, loaded: img.complete && img.naturalWidth > 0,
            nw: img.naturalWidth, iw: ir.width, ih: ir.height,
            box: br && {x: br.x - ir.x, y: br.y - ir.y, w: br.width, h: br.height},
            stroke: rect ? getComputedStyle(rect).stroke : null, href: a ? a.href : null};
  });
  const pre = document.createElement('pre'); pre.id = 'check'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


@pytest.mark.integration
def test_report_in_headless_chromium(make_ctx, tmp_path):
    ctx = gallery_ctx(make_ctx)
    key = write_report(ctx, DAY)
    page = ctx.store.get(key).decode()
    report = tmp_path / "report.html"
    report.write_text(page)
    # A copy with a checking script (the report itself has none) dumped after load.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK + "</body>"))
    res = _run_chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    found = re.search(r'<pre id="check">(.*?)</pre>', res.stdout, re.S)
    assert found, res.stdout[-2000:]
    figs = {f["sha"]: f for f in json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))}
    assert set(figs) == {sha(n) for n in "ABCD"}
    for f in figs.values():
        assert f["loaded"] and f["nw"] == 320 and f["iw"] == pytest.approx(200) and f["ih"] == pytest.approx(150)
    # Boxes sit where the detector put them: original pixels scaled to the 200 px thumbnail.
    for name, box in (("A", BOX_A), ("D", BOX_D)):
        got, s = figs[sha(name)]["box"], 200 / W
        assert got["x"] == pytest.approx(box[0] * s, abs=2) and got["y"] == pytest.approx(box[1] * s, abs=2)
        assert got["w"] == pytest.approx((box[2] - box[0]) * s, abs=3)
        assert got["h"] == pytest.approx((box[3] - box[1]) * s, abs=3)
        assert figs[sha(name)]["stroke"] == "rgb(228, 26, 28)"
    assert figs[sha("B")]["box"] is None
    assert figs[sha("A")]["href"] == "https://social.example/@u/p1"
    assert figs[sha("C")]["href"] == "https://social.example/@u/p3" and "review" in figs[sha("C")]["kind"]
    assert figs[sha("D")]["href"] is None  # its post's javascript: url is not linked
    # And a screenshot of the report itself (looked at by hand when this test was written).
    shot = tmp_path / "report.png"  # kept for a look: pytest --basetemp=DIR
    res = _run_chromium(tmp_path, "--window-size=1000,2400", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1000, 2400)
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert any(c[1][0] > 200 and c[1][1] < 60 and c[1][2] < 60 for c in colors)  # red box pixels


def test_evidence_cli_exports_images_and_csv(make_ctx, monkeypatch, tmp_path, capsys):
    ctx = gallery_ctx(make_ctx)
    s = ctx.settings
    for k, v in (("BRANDMON_DATABASE_URL", s.database_url), ("BRANDMON_STORAGE_URL", s.storage_url),
                 ("BRANDMON_CONFIG", str(s.config_path)), ("BRANDMON_HOME", str(s.home))):
        monkeypatch.setenv(k, v)
    out = tmp_path / "ev"
    assert main(["evidence", "--brand", "acme", "--date", DAY.isoformat(), "--out", str(out)]) == 0
    assert "2 counted and 1 review image(s) of Acme" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "evidence.csv").open()))
    assert [r["sha256"] for r in rows] == [sha("A"), sha("B"), sha("C")]
    a = rows[0]
    assert a["box"] == "100 120 300 260" and a["platform"] == "mastodon" and a["model_version"] == "m1"
    assert a["post_url"] == "https://social.example/@u/p1" and a["review_status"] == "counted"
    assert rows[1]["box"] == "" and rows[2]["review_status"] == "pending" and rows[2]["kind"] == "review"
    assert (out / a["file"]).read_bytes() == ctx.store.get(f"images/{sha('A')}")
    with Image.open(out / a["annotated_file"]) as im:
        px = im.convert("RGB").getpixel((round(100 * im.width / W), round(190 * im.height / H)))
        assert px[0] > 180 and px[1] < 90  # the red box edge is drawn in
    before = sorted(p.name for p in out.rglob("*"))
    assert main(["evidence", "--brand", "Acme", "--date", DAY.isoformat(), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.rglob("*")) == before  # idempotent
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    assert main(["evidence", "--brand", "Nobody", "--date", DAY.isoformat(), "--out", str(out)]) == 2
    assert "unknown brand 'Nobody'" in capsys.readouterr().err


def test_evidence_csv_cells_never_run_as_spreadsheet_formulas(make_ctx, backend, tmp_path):
    """Post URLs and platforms come from outside data: a cell starting with = + - @ is a formula
    in Excel/LibreOffice (`=HYPERLINK(...)`, `=cmd|...`); it is written as text ('-prefixed)."""
    from pipeline.aggregate.gallery import export_evidence

    ctx = gallery_ctx(make_ctx, backend)
    with ctx.engine.begin() as conn:
        conn.execute(update(posts).where(posts.c.id == 1).values(url='=HYPERLINK("http://evil.example","x")',
                                                                 platform="@SUM(1+1)"))
        conn.execute(update(posts).where(posts.c.id == 3).values(url="-2+3", platform="+cmd|' /C calc'!A0"))
    export_evidence(ctx, "Acme", DAY, tmp_path / "ev")
    rows = list(csv.DictReader((tmp_path / "ev" / "evidence.csv").open(encoding="utf-8")))
    by_sha = {r["sha256"]: r for r in rows}
    assert by_sha[sha("A")]["post_url"] == "'=HYPERLINK(\"http://evil.example\",\"x\")"
    assert by_sha[sha("A")]["platform"] == "'@SUM(1+1)"
    assert by_sha[sha("B")]["post_url"] == "'-2+3" and by_sha[sha("B")]["platform"] == "'+cmd|' /C calc'!A0"
    assert not any(v[:1] in "=+-@\t\r" for r in rows for v in r.values() if v)


def test_evidence_default_folder_and_top_are_safe(make_ctx, monkeypatch, tmp_path, capsys):
    from pipeline.aggregate.gallery import default_out

    assert default_out('$O\'Brien "q" <b>', DAY) == "evidence-_O_Brien_q_b_-2026-10-12"
    assert default_out("../../etc", DAY) == "evidence-.._.._etc-2026-10-12"  # one name, inside the cwd
    ctx = gallery_ctx(make_ctx)
    s = ctx.settings
    for k, v in (("BRANDMON_DATABASE_URL", s.database_url), ("BRANDMON_STORAGE_URL", s.storage_url),
                 ("BRANDMON_CONFIG", str(s.config_path)), ("BRANDMON_HOME", str(s.home))):
        monkeypatch.setenv(k, v)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for top in ("0", "-5"):
        assert main(["evidence", "--brand", "Acme", "--date", DAY.isoformat(), "--top", top]) == 2
        assert "--top must be at least 1" in capsys.readouterr().err
    assert list(cwd.iterdir()) == []
    assert main(["evidence", "--brand", "Acme", "--date", DAY.isoformat(), "--top", "1"]) == 0
    assert "1 counted and 1 review image(s)" in capsys.readouterr().out
    assert [p.name for p in cwd.iterdir()] == ["evidence-Acme-2026-10-12"]


def test_report_placeholder_for_a_corrupt_or_huge_image_says_why_and_fits(make_ctx, tmp_path):
    """A photo whose original is corrupt, a bomb or gone gets a placeholder that says so; its text
    wraps inside the grey box (a fixed 120px line height pushed the second line over the caption)."""
    ctx = gallery_ctx(make_ctx)
    ctx.store.put(f"images/{sha('A')}", b"\xff\xd8\xff\xe0 not a jpeg")
    ctx.store.put(f"images/{sha('B')}", _bomb_png())
    page = render_report(ctx, DAY)
    assert page.count("no preview: the image is missing from the lake, too large or unreadable") == 2
    css = re.search(r"\.missing \{([^}]*)\}", page).group(1)
    assert "line-height: 120px" not in css and "align-items: center" in css
    report = tmp_path / "r.html"
    report.write_text(page)
    shot = tmp_path / "r.png"
    res = _run_chromium(tmp_path, "--window-size=1000,1400", f"--screenshot={shot}", report.as_uri())
    assert res.returncode == 0 and shot.stat().st_size > 10_000, res.stderr[-2000:]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")  # 400 Mpixel, a few kB compressed
    return buf.getvalue()
