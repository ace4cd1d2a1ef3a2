"""Emit an asset event through Airflow 3's public REST API (used by `brandmon model activate`).

Why: activating a model on the command line changes which images are unscored, but only the
`brandmon://model` asset event makes `brandmon_detect` run for it; without one, detection waits
for the next ingest. When BRANDMON_AIRFLOW_API_URL is set (the api-server's base URL, e.g.
http://localhost:8080), the CLI gets a JWT from `POST /auth/token` with
BRANDMON_AIRFLOW_USER / BRANDMON_AIRFLOW_PASSWORD, looks the asset up by URI and posts the
event to `POST /api/v2/assets/events`. Standard library HTTP, every request bounded in wall-clock
time (not only per read) and bytes; errors are one line that never contains the password or the token.
"""

from __future__ import annotations

import contextlib
import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pipeline.errors import BrandmonError

TIMEOUT_S = 15.0
MAX_RESPONSE_BYTES = 1024 * 1024


class AirflowApiError(BrandmonError):
    """The Airflow REST API refused or could not be reached."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """The api-server answers these calls itself; following a redirect would carry the
    `Authorization: Bearer` token (urllib keeps it) to whatever host the answer names."""

    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # urllib then raises the 3xx as an HTTPError: one line, below


_OPENER = urllib.request.build_opener(_NoRedirect)


def _request(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    """One request, bounded in wall-clock time as a whole (TIMEOUT_S): the socket timeout
    alone bounds each read, and a server or proxy that trickles a byte at a time would hold
    `brandmon model activate` for ever. The request runs in a daemon thread; past the
    deadline it is abandoned (the CLI exits) with a one-line error."""
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            result["value"] = _request_once(method, url, body, token)
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    worker = threading.Thread(target=work, name="airflow-api", daemon=True)
    worker.start()
    worker.join(TIMEOUT_S)
    if worker.is_alive():
        where = f"{method} {urllib.parse.urlsplit(url).path}"
        raise AirflowApiError(
            f"Airflow API {where}: no complete answer within {TIMEOUT_S:g}s; check that "
            "BRANDMON_AIRFLOW_API_URL is the api-server and that it is healthy"
        )
    if "error" in result:
        raise result["error"]
    return result.get("value")


def _request_once(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    where = f"{method} {urllib.parse.urlsplit(url).path}"
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as response:  # http/https only, checked
            raw = response.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        detail = exc.read(2000).decode("utf-8", "replace")
        with contextlib.suppress(ValueError, AttributeError):
            detail = str(json.loads(detail).get("detail", detail))
        hint = "; check BRANDMON_AIRFLOW_USER / BRANDMON_AIRFLOW_PASSWORD" if exc.code in (401, 403) else ""
        raise AirflowApiError(f"Airflow API {where} answered {exc.code}: {' '.join(detail.split())[:300]}{hint}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AirflowApiError(f"cannot reach the Airflow API ({where}): {reason}; start the api-server or fix BRANDMON_AIRFLOW_API_URL") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise AirflowApiError(f"Airflow API {where} sent more than {MAX_RESPONSE_BYTES} bytes")
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise AirflowApiError(f"Airflow API {where} did not answer JSON (is BRANDMON_AIRFLOW_API_URL the api-server?)") from None


def api_token(base_url: str, username: str, password: str) -> str:
    """A JWT for the public API from the auth manager's `POST /auth/token`."""
    answer = _request("POST", f"{base_url}/auth/token", {"username": username, "password": password})
    token = answer.get("access_token") if isinstance(answer, dict) else None
    if not token:
        raise AirflowApiError("Airflow API POST /auth/token gave no access_token")
    return str(token)


def asset_id(base_url: str, token: str, uri: str) -> int:
    """The id of the asset `Asset(uri)` declares (a DAG that uses it must have been parsed).

    Looked up by name: Airflow keeps the URI as given for the name but normalises the stored
    `uri` (`brandmon://model` becomes `brandmon://model/`)."""
    query = urllib.parse.urlencode({"name_pattern": uri, "limit": 100})
    answer = _request("GET", f"{base_url}/api/v2/assets?{query}", token=token)
    assets = (answer or {}).get("assets", []) if isinstance(answer, dict) else []
    for asset in assets:
        if asset.get("name") == uri or str(asset.get("uri") or "").rstrip("/") == uri.rstrip("/"):
            return int(asset["id"])
    seen = ", ".join(str(a.get("uri")) for a in assets[:10]) or "none"
    raise AirflowApiError(f"Airflow knows no asset {uri} (matching: {seen}); are the brandmon DAGs deployed and parsed?")


def emit_asset_event(base_url: str, username: str, password: str, uri: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Post one event for the asset `uri`; returns the API's event record (id, timestamp, ...)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise AirflowApiError(f"BRANDMON_AIRFLOW_API_URL={base_url!r} is not an http(s) URL; e.g. http://localhost:8080")
    if not username or not password:
        raise AirflowApiError("BRANDMON_AIRFLOW_API_URL is set but BRANDMON_AIRFLOW_USER / BRANDMON_AIRFLOW_PASSWORD are not")
    base = base_url.rstrip("/")
    token = api_token(base, username, password)
    event = _request("POST", f"{base}/api/v2/assets/events", {"asset_id": asset_id(base, token, uri), "extra": extra}, token=token)
    return event if isinstance(event, dict) else {}
