"""Object store: the same behaviour on the local folder and on a real S3 API server."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import InvalidKeyError, StorageError
from pipeline.objectstore import LocalStore, open_store, parse_storage_url, validate_key


@pytest.mark.parametrize(
    "key", ["../x", "a/../b", "/abs", "a//b", "a/./b", "nul\x00byte", "tab\tkey", "C:/win", "back\\slash", ""]
)
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_valid_keys_pass() -> None:
    assert validate_key("raw/source=masto/dt=2026-10-01/part-0.jsonl.gz")


def test_round_trip_list_delete(make_ctx, backend: str) -> None:
    store = make_ctx(backend=backend).store
    store.put("raw/a/1.bin", b"one")
    store.put("raw/a/2.bin", b"two")
    store.put("images/x.bin", b"\x00\xff")
    store.put("raw/a/1.bin", b"uno")  # overwrite
    assert store.get("raw/a/1.bin") == b"uno"
    assert store.get("images/x.bin") == b"\x00\xff"
    assert sorted(store.list("raw/")) == ["raw/a/1.bin", "raw/a/2.bin"]
    assert store.exists("raw/a/2.bin")
    store.delete("raw/a/2.bin")
    assert not store.exists("raw/a/2.bin")
    with pytest.raises(KeyError):
        store.get("raw/a/2.bin")
    with pytest.raises(InvalidKeyError):
        store.put("../escape", b"x")


def test_local_writes_leave_no_temp_files(tmp_path) -> None:
    store = LocalStore(tmp_path / "lake")
    for i in range(5):
        store.put("k/v", str(i).encode())
    assert [p.name for p in (tmp_path / "lake" / "k").iterdir()] == ["v"]


def test_a_local_write_that_the_filesystem_refuses_is_a_storage_error(tmp_path) -> None:
    """A file where a folder of the key should be (or a full disk, a read-only mount) reached
    `brandmon model export` as `internal error: NotADirectoryError`; nothing half-written stays."""
    from pipeline.errors import StorageError

    store = LocalStore(tmp_path / "lake")
    store.put("models/exports", b"a file, not a folder")
    with pytest.raises(StorageError, match=r"cannot write models/exports/x/onnx.zip into the lake folder .*: Not a directory"):
        store.put("models/exports/x/onnx.zip", b"zip")
    store.put("k/v", b"old")
    (tmp_path / "lake" / "k" / "v").unlink()
    (tmp_path / "lake" / "k" / "v").mkdir()  # os.replace onto a folder fails after the temp file is written
    with pytest.raises(StorageError, match="cannot write k/v"):
        store.put("k/v", b"new")
    assert [p.name for p in (tmp_path / "lake" / "k").iterdir()] == ["v"]  # no .tmp- file left


@pytest.mark.integration
def test_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here/prefix", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="does not exist.*create it"):
        store.check()


@pytest.mark.integration
def test_errors_below_s3_are_storage_errors(monkeypatch, s3_endpoint: str, s3_proxy) -> None:
    """No answer at all (nothing listening, a dropped connection, a cut body) is a StorageError
    with a hint, from every operation, never a raw botocore exception."""
    from tests.support.services import create_bucket, free_port

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    down = open_store("s3://any-bucket/lake", endpoint_url=f"http://127.0.0.1:{free_port()}")
    for op in (down.get, down.exists, lambda k: down.put(k, b"x"), down.delete, lambda k: list(down.list(k))):
        with pytest.raises(StorageError, match="EndpointConnectionError.*start the S3 server or fix BRANDMON_S3_ENDPOINT_URL"):
            op("raw/k")
    create_bucket(s3_endpoint, "proxied-bucket")
    store = open_store("s3://proxied-bucket/lake", endpoint_url=s3_proxy.url)
    store.put("raw/k", b"x" * 10_000)
    s3_proxy.fault("GET", "/raw/k$", kind="truncate")
    with pytest.raises(StorageError, match="ResponseStreamingError.*re-run"):
        store.get("raw/k")
    s3_proxy.fault("HEAD", "/raw/k$", kind="drop")
    with pytest.raises(StorageError, match="ConnectionClosedError.*re-run"):
        store.exists("raw/k")
    assert store.get("raw/k") == b"x" * 10_000 and store.exists("raw/k")  # the faults were one-offs


@pytest.mark.integration
@pytest.mark.parametrize(("code", "op"), [("SlowDown", "put"), ("InternalError", "get")])
def test_s3_error_answers_are_retried_then_clear(monkeypatch, s3_endpoint: str, s3_proxy, code: str, op: str) -> None:
    """Real S3 error answers: boto3 retries a burst away; a persistent one is one clear StorageError."""
    from tests.support.services import create_bucket

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    bucket = f"retry-{code.lower()}"
    create_bucket(s3_endpoint, bucket)
    store = open_store(f"s3://{bucket}/lake", endpoint_url=s3_proxy.url)
    store.put("raw/k", b"v1")
    method = "PUT" if op == "put" else "GET"
    call = (lambda: store.put("raw/k", b"v2")) if op == "put" else (lambda: store.get("raw/k"))
    burst = s3_proxy.fault(method, "/raw/k$", code=code, times=2)
    call()
    assert burst.fired == 2
    s3_proxy.clear()
    persistent = s3_proxy.fault(method, "/raw/k$", code=code, times=100)
    with pytest.raises(StorageError, match=f"S3 {op} on s3://{bucket} failed: {code} \\(still failing after 3 attempts\\)"):
        call()
    assert persistent.fired == 3


# --- the one storage / s3:// URL parser ------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "scheme", "bucket", "prefix", "path"),
    [
        ("s3://bucket", "s3", "bucket", "", ""),
        ("s3://bucket/", "s3", "bucket", "", "/"),
        ("s3://bucket/a/b/", "s3", "bucket", "a/b/", "/a/b/"),
        ("s3://bucket/a%20b/c", "s3", "bucket", "a b/c", "/a b/c"),
        ("file:///abs/lake", "file", "", "abs/lake", "/abs/lake"),
        ("file:///abs/with%20space", "file", "", "abs/with space", "/abs/with space"),
        ("./var/lake", "", "", "./var/lake", "./var/lake"),
    ],
)
def test_storage_urls_parse(url, scheme, bucket, prefix, path):
    loc = parse_storage_url(url)
    assert (loc.scheme, loc.bucket, loc.prefix, loc.path) == (scheme, bucket, prefix, path)


def test_local_paths():
    assert str(parse_storage_url("file:///abs/with%20space").local_path) == "/abs/with space"
    assert str(parse_storage_url("var/lake").local_path) == "var/lake"


segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)


@given(st.from_regex(r"\A[a-z0-9][a-z0-9.-]{1,20}[a-z0-9]\Z"), st.lists(segment, max_size=4), st.booleans())
def test_s3_urls_round_trip(bucket, parts, trailing):
    prefix = "/".join(parts) + ("/" if trailing and parts else "")
    loc = parse_storage_url(f"s3://{bucket}/{prefix}")
    assert (loc.scheme, loc.bucket, loc.prefix) == ("s3", bucket, prefix)


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_value_error(text):
    try:
        loc = parse_storage_url(text)
    except ValueError:  # urllib's own refusal (e.g. an unclosed IPv6 bracket)
        return
    assert loc.url == text and isinstance(loc.prefix, str)


def test_open_store_and_the_archive_use_the_parser(tmp_path):
    from pipeline.sources.archive.files import ArchiveFiles

    store = open_store((tmp_path / "a b").as_uri())
    assert isinstance(store, LocalStore) and store.root == tmp_path / "a b"
    files = ArchiveFiles((tmp_path / "x y").as_uri(), None)
    assert not files.s3 and files.root == tmp_path / "x y"
    with pytest.raises(StorageError, match="unknown storage scheme 'ftp'"):
        open_store("ftp://host/x")
