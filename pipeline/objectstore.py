"""The object store (the "lake"): raw feed responses, images, model artifacts, reports.

Two backends behind one small interface: a local folder (the default; writes are atomic via a
temporary file and `os.replace`) and S3 through boto3 (MinIO, moto_server or AWS). Keys are
relative, '/'-separated and validated, so no key can escape its prefix.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from pipeline.errors import InvalidKeyError, StorageError
from pipeline.redact import redact_url, scrub_text, url_passwords
from pipeline.settings import s3_max_attempts

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_key(key: str) -> str:
    """Refuse keys that are absolute, contain `..`/`.` segments, backslashes or control chars."""
    if not isinstance(key, str) or not key:
        raise InvalidKeyError("object key must be a non-empty string")
    if len(key.encode("utf-8", "surrogatepass")) > 1024:
        raise InvalidKeyError("object key longer than 1024 bytes")
    if _CONTROL.search(key):
        raise InvalidKeyError(f"object key contains a control character: {key!r}")
    if key.startswith("/") or "\\" in key or re.match(r"^[A-Za-z]:", key):
        raise InvalidKeyError(f"object key must be relative: {key!r}")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise InvalidKeyError(f"object key has an empty, '.' or '..' segment: {key!r}")
    return key


class ObjectStore(Protocol):
    url: str

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get(self, key: str) -> bytes: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str = "") -> Iterator[str]: ...
    def check(self) -> None: ...


class LocalStore:
    """A folder. `put` writes a temp file in the target folder then renames it into place."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        """The file of `key`, inside the lake root even where a folder in it is a symlink."""
        from pipeline.safepath import UnsafePath, safe_join

        try:
            return safe_join(self.root, *validate_key(key).split("/"), what="object key")
        except UnsafePath as exc:
            raise InvalidKeyError(str(exc)) from None

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        try:  # a file where a folder of the key should be, a full disk, a read-only mount
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        except OSError as exc:
            raise StorageError(f"cannot write {key} into the lake folder {self.root}: {exc.strerror or exc}") from None
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {key} into the lake folder {self.root}: {exc.strerror or exc}") from None
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        base = self.root
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                rel = Path(dirpath, name).relative_to(base).as_posix()
                if rel.startswith(prefix):
                    yield rel

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the lake folder {self.root}: {exc.strerror}") from None
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"the lake folder {self.root} is not writable")


def s3_client(endpoint_url: str | None = None, session: Any = None, max_attempts: int | None = None) -> Any:
    """The one S3 client factory (the lake, archive exports): bounded connect/read timeouts and
    the retry budget of AWS_MAX_ATTEMPTS. `session`: a boto3 Session (e.g. Airflow's AWS hook);
    None: boto3's default credential chain."""
    import boto3
    from botocore.config import Config

    attempts = s3_max_attempts() if max_attempts is None else max_attempts
    return (session or boto3).client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(retries={"total_max_attempts": attempts, "mode": "adaptive"}, connect_timeout=10, read_timeout=60),
    )


class S3Store:
    """An S3 bucket (optionally under a prefix), through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        session: Any = None,
        credentials_hint: str = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an AWS profile)",
        endpoint_hint: str = "BRANDMON_S3_ENDPOINT_URL",
    ) -> None:
        """`session`: a boto3 Session to make the client with (e.g. from Airflow's AWS hook:
        the connection's keys, role or profile); None: boto3's default credential chain.
        `credentials_hint` is what an access-denied error tells the user to check,
        `endpoint_hint` what to fix when the endpoint cannot be reached (the variable, or the
        Airflow connection it came from)."""
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.endpoint_url = endpoint_url
        self.max_attempts = s3_max_attempts()
        self.credentials_hint = credentials_hint
        self.endpoint_hint = endpoint_hint
        self.client = s3_client(endpoint_url, session, self.max_attempts)

    def _key(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, what: str) -> StorageError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "?")
            if code in ("NoSuchBucket", "404") and what == "check":
                return StorageError(
                    f"S3 bucket {self.bucket!r} does not exist at {redact_url(self.endpoint_url) if self.endpoint_url else 'AWS'}; create it "
                    f"(aws s3 mb s3://{self.bucket}) or fix BRANDMON_STORAGE_URL"
                )
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return StorageError(
                    f"S3 {what} on s3://{self.bucket} was refused ({code}); check {self.credentials_hint} "
                    "and the bucket policy"
                )
            if code in ("SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "500", "503"):
                return StorageError(
                    f"S3 {what} on s3://{self.bucket} failed: {code} (still failing after {self.max_attempts} attempts); "
                    "the S3 server is throttling or failing: re-run the same command later"
                )
            return StorageError(f"S3 {what} on s3://{self.bucket} failed: {code}")
        hint = ""
        name = type(exc).__name__
        if name == "NoCredentialsError":
            hint = f"; set {self.credentials_hint}"
        elif name in ("EndpointConnectionError", "ConnectTimeoutError"):
            hint = f"; start the S3 server or fix {self.endpoint_hint}"
        elif name in ("ConnectionClosedError", "ReadTimeoutError", "ResponseStreamingError", "IncompleteReadError",
                      "ProtocolError", "ConnectionError", "HTTPClientError"):
            hint = "; the S3 server dropped the connection or sent a short answer: re-run the same command"
        else:
            hint = f"; check BRANDMON_STORAGE_URL and {self.endpoint_hint}, then re-run the same command"
        # botocore puts the endpoint URL (userinfo and all) into its messages
        detail = scrub_text(" ".join(str(exc).split()), url_passwords(self.endpoint_url))[:300]
        return StorageError(f"S3 {what} on s3://{self.bucket} failed: {name}: {detail}{hint}")

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        full = self._key(key)  # an InvalidKeyError keeps its own type
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data, **extra)
        except Exception as exc:  # boto raises many types; all become one clear StorageError
            raise self._fail(exc, "put") from None

    def get(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        full = self._key(key)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=full)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise KeyError(key) from None
            raise self._fail(exc, "get") from None
        except Exception as exc:  # connection refused or dropped, a truncated body, ...
            raise self._fail(exc, "get") from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        full = self._key(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=full)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return False
            raise self._fail(exc, "head") from None
        except Exception as exc:
            raise self._fail(exc, "head") from None

    def delete(self, key: str) -> None:
        full = self._key(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise self._fail(exc, "delete") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        if ".." in prefix.split("/"):
            raise InvalidKeyError(f"list prefix has a '..' segment: {prefix!r}")
        base = f"{self.prefix}/" if self.prefix else ""
        full, strip = base + prefix, len(base)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield obj["Key"][strip:]
        except Exception as exc:
            raise self._fail(exc, "list") from None

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            raise self._fail(exc, "check") from None


@dataclass(frozen=True)
class StorageURL:
    """A storage location as given: `s3://bucket/prefix`, `file:///abs/path` or a plain path."""

    url: str
    scheme: str  # "s3", "file", "" (a plain path) or what else was written
    netloc: str  # the bucket of an s3 URL (a file URL's host, which is refused)
    raw_path: str  # as written (percent-encoded)

    @property
    def bucket(self) -> str:
        return self.netloc

    @property
    def path(self) -> str:
        """The percent-decoded path: an s3 key prefix (with its leading `/`) or a file path."""
        return unquote(self.raw_path)

    @property
    def prefix(self) -> str:
        """The s3 key prefix, without its leading `/` (a trailing one is kept)."""
        return self.path.lstrip("/")

    @property
    def local_path(self) -> Path:
        return Path(self.path) if self.scheme == "file" else Path(self.url)


def parse_storage_url(url: str) -> StorageURL:
    """The one parser of storage and `s3://` URLs (the lake, archive paths)."""
    parts = urlsplit(url)
    return StorageURL(url=url, scheme=parts.scheme, netloc=parts.netloc, raw_path=parts.path)


def open_store(url: str, endpoint_url: str | None = None, session: Any = None, **s3: Any) -> ObjectStore:
    """Open the store named by BRANDMON_STORAGE_URL (file:///abs, a plain path, or s3://...);
    `session` and `s3` (credentials_hint) are for S3 only."""
    loc = parse_storage_url(url)
    if loc.scheme == "s3":
        return S3Store(loc.bucket, loc.path, endpoint_url=endpoint_url, session=session, **s3)
    if loc.scheme in ("file", ""):
        return LocalStore(loc.local_path)
    raise StorageError(f"unknown storage scheme {loc.scheme!r}; use file:///abs/path or s3://bucket/prefix")
