"""Object store: the same behaviour on the local folder and on a real S3 API server."""

from __future__ import annotations

import pytest

from pipeline.errors import InvalidKeyError, StorageError
from pipeline.objectstore import LocalStore, open_store, validate_key


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


@pytest.mark.integration
def test_missing_bucket_is_a_clear_error(s3_endpoint: str) -> None:
    store = open_store("s3://no-such-bucket-here/prefix", endpoint_url=s3_endpoint)
    with pytest.raises(StorageError, match="does not exist.*create it"):
        store.check()
