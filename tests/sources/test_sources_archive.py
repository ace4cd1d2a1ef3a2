"""Archive index internals: reading (and gunzipping) exports on a helper thread."""

from __future__ import annotations

import gzip
import io
import re
import sys
import threading

import pytest

from pipeline.sources.archive.files import (
    ArchiveFileError,
    Limits,
    file_blocks,
    iter_json_lines,
    quick_gil_handoffs,
    read_ahead,
)


def lines_of(data: bytes) -> list[bytes]:
    return [x.strip() for x in data.split(b"\n") if x.strip()]


def test_file_blocks_gunzips_like_gzip():
    text = b"".join(b'{"id": %d, "text": "%s"}\n' % (i, b"x" * (i % 300)) for i in range(60_000))
    one = gzip.compress(text, mtime=0)
    members = gzip.compress(text[:1_000_003], mtime=0) + gzip.compress(text[1_000_003:], mtime=0) + b"\x00" * 10
    for data in (one, members):
        done = [0]
        got = b"".join(file_blocks(io.BytesIO(data), True, done, size=65_536))
        assert got == gzip.decompress(data) == text
        assert done[0] == len(data)
    assert b"".join(file_blocks(io.BytesIO(text), False, [0], size=4096)) == text
    bomb = gzip.compress(b"\n" * (40 << 20))  # inflates 1000x: yielded in bounded blocks
    assert max(len(b) for b in file_blocks(io.BytesIO(bomb), True, [0])) <= 16 << 20


def test_file_blocks_errors():
    """Every way a gzip file can be bad is one `ArchiveFileError` with the reason (the caller
    quarantines the file)."""
    data = gzip.compress(b'{"id": 1}\n' * 1000)
    cases = {
        "truncated gzip file": data[:-20],
        "not a gzip file": b'{"id": 1}\n',
        "corrupt gzip data": data[:-8] + b"\x00\x00\x00\x00" + data[-4:],  # bad CRC
        "not a gzip file (empty)": b"",
    }
    for reason, bad in cases.items():
        with pytest.raises(ArchiveFileError, match=re.escape(reason)):
            b"".join(file_blocks(io.BytesIO(bad), True, [0]))


def test_file_blocks_caps():
    text = b'{"id": 1}\n' * 100_000  # 1 MB
    with pytest.raises(ArchiveFileError, match="over max_file_bytes"):
        b"".join(file_blocks(io.BytesIO(text), False, [0], size=65_536, limits=Limits(max_file_bytes=500_000)))
    with pytest.raises(ArchiveFileError, match="over max_file_bytes"):
        b"".join(file_blocks(io.BytesIO(gzip.compress(text)), True, [0], limits=Limits(max_file_bytes=500_000)))
    assert b"".join(file_blocks(io.BytesIO(text), False, [0], limits=Limits(max_file_bytes=len(text)))) == text
    bomb = gzip.compress(b"\n" * (100 << 20))  # 1000x
    with pytest.raises(ArchiveFileError, match="gzip expands more than 200x"):
        for _ in file_blocks(io.BytesIO(bomb), True, [0]):
            pass


def test_iter_json_lines_caps_long_lines():
    text = b'{"a": 1}\n' + b"x" * 5000 + b"\n" + b'{"b": 2}\n' + b"y" * 3000
    for size in (1, 7, 100, 4096, 10**6):
        got = list(iter_json_lines((text[i : i + size] for i in range(0, len(text), size)), max_row=1000))
        assert got == [(1, b'{"a": 1}'), (2, None), (3, b'{"b": 2}'), (4, None)], size


def test_iter_json_lines_over_blocks_of_any_size():
    text = b'{"a": 1}\n\n  {"b": 2}  \r\n' * 5000 + b'{"c": 3}'
    want = [(n, line) for n, line in enumerate(text.split(b"\n"), 1) if line.strip()]
    want = [(n, line.strip()) for n, line in want]
    for size in (1, 7, 4096, 10**7):
        assert list(iter_json_lines(text[i : i + size] for i in range(0, len(text), size))) == want


def test_read_ahead_passes_blocks_errors_and_stops_early():
    assert list(read_ahead(iter([b"a", b"b", b"c"]))) == [b"a", b"b", b"c"]

    def failing():
        yield b"a"
        raise OSError("disk gone")

    it = read_ahead(failing())
    assert next(it) == b"a"
    with pytest.raises(OSError, match="disk gone"):
        next(it)

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield b"x"
            i += 1

    before = threading.active_count()
    it = read_ahead(endless(), depth=2)
    next(it)
    it.close()  # the consumer leaves early: the reader thread ends
    assert threading.active_count() == before
    assert len(produced) < 10


def test_quick_gil_handoffs_restores_the_interval():
    old = sys.getswitchinterval()
    with quick_gil_handoffs(0.001):
        assert sys.getswitchinterval() == pytest.approx(0.001)
    assert sys.getswitchinterval() == old


def test_archive_s3_client_is_the_stores_bounded_client(monkeypatch):
    """One S3 client factory (`objectstore.s3_client`): an s3:// archive gets the lake's
    timeouts and retry budget (AWS_MAX_ATTEMPTS), not boto3's defaults (60 s connect)."""
    from pipeline.objectstore import S3Store
    from pipeline.sources.archive.files import ArchiveFiles

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "4")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    archive = ArchiveFiles("s3://exports/brand", endpoint_url="http://127.0.0.1:9").\
        _client.meta.config
    store = S3Store("lake", endpoint_url="http://127.0.0.1:9").client.meta.config
    for cfg in (archive, store):
        assert (cfg.connect_timeout, cfg.read_timeout) == (10, 60)
        assert cfg.retries["total_max_attempts"] == 4
