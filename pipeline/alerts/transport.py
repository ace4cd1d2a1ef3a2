"""Sending one alert to one destination: bounded requests, retries with backoff, no secrets.

Two transports share one interface (`send_once(dest, outgoing, timeout_s)`):

* `PlainTransport` (the CLI): `requests` for webhooks and Slack, `smtplib` for email. Secrets
  come from the environment variable the YAML names (`url_env`, `password_env`), or from the
  Airflow connection `conn_id` (resolved through Airflow's secrets backends, e.g. an
  `AIRFLOW_CONN_<ID>` variable).
* `AirflowTransport` (inside a task): a Slack destination with `conn_id` goes through the Slack
  provider's `SlackWebhookHook`, an email one through the SMTP provider's `SmtpHook`; a generic
  webhook has no provider hook of its own and is posted like the CLI does.

Every request is bounded: `timeout_s` for connecting and the headers (urllib3's total
timeout) and for the whole answer (a watchdog), at most `max_response_bytes` of it read; an
SMTP exchange by `timeout_s` per socket operation. `deliver` retries a failed send with exponential
backoff within `retries` requests and `max_total_s` seconds. Errors are short texts built
from the failure's kind (HTTP status, "connection refused", "no answer within 2 s"), then
scrubbed of every secret value the destination uses: they go to logs and the ledger.
"""

from __future__ import annotations

import base64
import contextlib
import email.policy
import html
import json
import logging
import math
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import requests
from urllib3.util import Timeout

from pipeline.airflow_support import scrub
from pipeline.alerts.config import AlertsConfig, Destination
from pipeline.alerts.message import one_line
from pipeline.settings import environ

log = logging.getLogger(__name__)

USER_AGENT = "brandmon-alerts/1"
_CONVENTIONAL_ENV = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


class DeliveryError(Exception):
    """One failed send; the message is safe to log and store (scrubbed)."""


class SetupError(DeliveryError):
    """The destination is not usable as set up (a variable unset, not a URL, no such connection):
    no request was made, and trying again within the same round cannot help."""


@dataclass(frozen=True)
class Outgoing:
    """One alert rendered for every kind of destination."""

    alert_id: str
    subject: str
    text: str
    slack: dict[str, Any]
    webhook: dict[str, Any]


@dataclass
class Smtp:
    host: str
    port: int
    starttls: bool
    username: str | None
    password: str | None
    sender: str
    timeout_s: float | None = None


def _reason(exc: BaseException) -> str:
    """The root cause of a network failure in a few words (never the exception's text)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, socket.gaierror):
            return "unknown host"
        if isinstance(e, TimeoutError | socket.timeout):
            return "timed out"
        if isinstance(e, ConnectionResetError):
            return "connection reset"
        for nxt in (e.__cause__, e.__context__, *[a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]):
            if nxt is not None:
                todo.append(nxt)
        reason = getattr(e, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)
    return type(exc).__name__


def _http_url(value: str, what: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SetupError(f"{what} is not an http(s) URL")
    return value.strip()


def post_json(url: str, body: Mapping[str, Any], *, timeout_s: float, max_bytes: int,
              headers: Mapping[str, str] | None = None) -> None:
    """POST `body` as JSON; a non-2xx answer, a timeout or a dropped connection raise DeliveryError.

    Time: urllib3's `total` timeout covers connecting and the headers; a watchdog closes the
    response if its body is still coming at the deadline (a server dripping bytes would
    otherwise reset the per-read timeout forever). Bytes: at most `max_bytes` are read."""
    data = json.dumps(body, default=str).encode("utf-8")
    start = time.monotonic()
    hdrs = {"Content-Type": "application/json", "User-Agent": USER_AGENT, **(headers or {})}
    late = threading.Event()
    head = b""
    try:
        with requests.post(url, data=data, headers=hdrs, stream=True, allow_redirects=False,
                           timeout=Timeout(connect=timeout_s, read=timeout_s, total=timeout_s)) as resp:
            status = resp.status_code

            def cut() -> None:
                # shutdown() wakes a read blocked in another thread; close() alone does not
                late.set()
                sock = _socket_of(resp)
                with contextlib.suppress(OSError):
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                resp.close()

            watchdog = threading.Timer(max(0.0, timeout_s - (time.monotonic() - start)), cut)
            watchdog.daemon = True
            watchdog.start()
            try:
                got = 0
                for chunk in resp.iter_content(4096):
                    if len(head) < 300:
                        head += chunk[: 300 - len(head)]
                    got += len(chunk)
                    if got >= max_bytes:
                        break  # the answer's content does not matter beyond its status
            except Exception:
                if late.is_set():
                    raise DeliveryError(f"answer not complete within {timeout_s:.3g} s") from None
                raise
            finally:
                watchdog.cancel()
            if late.is_set():
                raise DeliveryError(f"answer not complete within {timeout_s:.3g} s")
    except requests.Timeout:
        raise DeliveryError(f"no answer within {timeout_s:.3g} s") from None
    except requests.ConnectionError as exc:
        raise DeliveryError(f"cannot connect: {_reason(exc)}") from None
    except requests.RequestException as exc:
        raise DeliveryError(f"request failed: {type(exc).__name__}") from None
    if not 200 <= status < 300:
        excerpt = head.decode("utf-8", "replace").strip().replace("\n", " ")[:200]
        raise DeliveryError(f"HTTP {status}" + (f": {excerpt}" if excerpt else ""))


# Long subjects stay on one line (RFC 5322 allows 998 characters): folded ones arrive with a
# leading space in some clients.
_MAIL_POLICY = email.policy.SMTP.clone(max_line_length=998)


def _socket_of(resp: requests.Response) -> socket.socket | None:
    """The socket under a streamed response (urllib3 2 hands it to http.client's reader)."""
    conn_sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if conn_sock is not None:
        return conn_sock
    fp = getattr(getattr(resp.raw, "_fp", None), "fp", None)
    return getattr(getattr(fp, "raw", None), "_sock", None)


def build_email(smtp: Smtp, to: Iterable[str], out: Outgoing) -> EmailMessage:
    msg = EmailMessage(policy=_MAIL_POLICY)
    msg["Subject"] = one_line(out.subject)
    msg["From"] = smtp.sender
    msg["To"] = ", ".join(to)
    msg["Date"] = formatdate(usegmt=True)
    msg["Message-ID"] = make_msgid(domain="brandmon.alerts")
    msg["X-Brandmon-Alert"] = one_line(out.alert_id)
    msg.set_content(out.text)
    return msg


def send_smtp(smtp: Smtp, to: Iterable[str], out: Outgoing, timeout_s: float) -> None:
    """One plain-text email through smtplib (STARTTLS when asked, login when a password is given).

    Time: `timeout_s` per socket operation, and a watchdog that shuts the socket at `timeout_s`
    for the whole exchange (a server dripping its greeting a byte at a time would otherwise
    reset the per-read timeout for an hour)."""
    to = list(to)
    msg = build_email(smtp, to, out)
    client = smtplib.SMTP(timeout=timeout_s)
    late = threading.Event()

    def cut() -> None:
        late.set()
        sock = getattr(client, "sock", None)
        with contextlib.suppress(OSError):
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)

    watchdog = threading.Timer(timeout_s, cut)
    watchdog.daemon = True
    watchdog.start()
    try:
        client.connect(smtp.host, smtp.port)
        client.ehlo()
        if smtp.starttls:
            client.starttls(context=ssl.create_default_context())
            client.ehlo()
        if smtp.username and smtp.password:
            client.login(smtp.username, smtp.password)
        client.send_message(msg, to_addrs=to)
        with contextlib.suppress(smtplib.SMTPException, OSError):  # sent: a failed goodbye does not matter
            client.quit()
    except Exception as exc:
        if late.is_set():
            raise DeliveryError(f"SMTP exchange not complete within {timeout_s:.3g} s") from None
        _smtp_error(exc, timeout_s)
        raise
    finally:
        watchdog.cancel()
        with contextlib.suppress(Exception):
            client.close()


def _smtp_error(exc: Exception, timeout_s: float) -> None:
    """Raise the DeliveryError saying in a few words what `exc` (from smtplib) means."""
    if isinstance(exc, smtplib.SMTPNotSupportedError):
        raise DeliveryError("the SMTP server does not offer STARTTLS (or login); set starttls: false "
                            "only for a trusted local relay") from None
    if isinstance(exc, smtplib.SMTPAuthenticationError):
        raise DeliveryError(f"SMTP login refused (code {exc.smtp_code})") from None
    if isinstance(exc, smtplib.SMTPResponseException):
        raise DeliveryError(f"SMTP server answered {exc.smtp_code}") from None
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        raise DeliveryError("SMTP server refused every recipient") from None
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        if _reason(exc) == "timed out":  # smtplib reports a read timeout as a disconnect
            raise DeliveryError(f"no answer from the SMTP server within {timeout_s:.3g} s") from None
        raise DeliveryError("SMTP server closed the connection") from None
    if isinstance(exc, smtplib.SMTPException):
        raise DeliveryError(f"SMTP error: {type(exc).__name__}") from None
    if isinstance(exc, ssl.SSLError):
        raise DeliveryError(f"TLS failed: {exc.reason or type(exc).__name__}") from None
    if isinstance(exc, OSError):
        if _reason(exc) == "timed out":
            raise DeliveryError(f"no answer from the SMTP server within {timeout_s:.3g} s") from None
        raise DeliveryError(f"cannot connect: {_reason(exc)}") from None


def _connection(conn_id: str) -> Any:
    from pipeline.airflow_support import get_connection

    try:
        conn = get_connection(conn_id)
    except Exception as exc:  # Airflow not configured, secrets backend down
        raise DeliveryError(f"cannot read Airflow connection {conn_id!r}: {type(exc).__name__}") from None
    if conn is None:
        raise SetupError(f"Airflow connection {conn_id!r} does not exist")
    return conn


def _extra(conn: Any) -> dict[str, Any]:
    try:
        extra = conn.extra_dejson
    except Exception:
        return {}
    return extra if isinstance(extra, dict) else {}


def slack_url_from_connection(conn: Any) -> str:
    """The webhook URL of a `slackwebhook` connection, read the way SlackWebhookHook reads it."""
    token = (conn.password or "").strip()
    if not token:
        raise SetupError(f"Airflow connection {conn.conn_id!r} has no webhook token/URL in its password")
    if "://" in token:
        return token
    base = conn.host if conn.host and "://" in conn.host else f"{conn.schema or 'https'}://{conn.host or 'hooks.slack.com/services'}"
    return base.rstrip("/") + "/" + token.lstrip("/")


def webhook_url_from_connection(conn: Any) -> str:
    """An http connection: `host` holds the whole URL, or host/port/schema(path) plus extra `scheme`."""
    host = (conn.host or "").strip()
    if "://" in host:
        return host
    if not host:
        raise SetupError(f"Airflow connection {conn.conn_id!r} has no host")
    scheme = _extra(conn).get("scheme") or "https"
    port = f":{conn.port}" if conn.port else ""
    path = "/" + conn.schema.lstrip("/") if conn.schema else ""
    return f"{scheme}://{host}{port}{path}"


class PlainTransport:
    """The CLI's transport: requests + smtplib, secrets from the environment or a connection."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env = environ() if env is None else env

    def _env(self, name: str, what: str, dest: Destination, key: str) -> str:
        value = (self.env.get(name) or "").strip()
        if not value:
            # a name that does not look like one (lower case, digits) may be the secret itself
            # pasted into the YAML: the error (logged, stored) then says where, not what
            shown = name if _CONVENTIONAL_ENV.match(name) else f"named by {key} of destination {dest.name}"
            raise SetupError(f"environment variable {shown} is not set (it should hold {what})")
        return value

    def url(self, dest: Destination) -> str:
        if dest.url_env:
            url = self._env(dest.url_env, f"the {dest.kind} URL", dest, "url_env")
            shown = f"${dest.url_env}" if _CONVENTIONAL_ENV.match(dest.url_env) else f"url_env of {dest.name}"
            return _http_url(url, shown)
        conn = _connection(str(dest.conn_id))
        url = slack_url_from_connection(conn) if dest.kind == "slack" else webhook_url_from_connection(conn)
        return _http_url(url, f"the URL of Airflow connection {dest.conn_id!r}")

    def smtp(self, dest: Destination) -> Smtp:
        if dest.conn_id and not dest.host:
            conn = _connection(dest.conn_id)
            extra = _extra(conn)
            sender = dest.sender or extra.get("from_email")
            if not sender:
                raise SetupError(f"no sender: set `from:` or the connection's extra from_email ({dest.conn_id})")
            return Smtp(host=conn.host or "localhost", port=int(conn.port or 587),
                        starttls=not bool(extra.get("disable_tls", False)), username=conn.login or None,
                        password=conn.password or None, sender=str(sender),
                        timeout_s=float(extra["timeout"]) if extra.get("timeout") else None)
        password = self._env(dest.password_env, "the SMTP password", dest, "password_env") if dest.password_env else None
        return Smtp(host=str(dest.host), port=dest.port, starttls=dest.starttls, username=dest.username,
                    password=password, sender=str(dest.sender))

    def secrets(self, dest: Destination) -> list[str]:
        """Every secret value this destination uses (to scrub from errors); never raises."""
        out: list[str] = []
        for name in (dest.url_env, dest.password_env):
            if name and self.env.get(name):
                out.append(str(self.env[name]))
        if dest.conn_id:
            from pipeline.airflow_support import get_connection

            try:
                conn = get_connection(dest.conn_id)
            except Exception:
                conn = None
            if conn is not None:
                out += [str(v) for v in (conn.password, conn.host) if v]
                with contextlib.suppress(DeliveryError):
                    out.append(self.url(dest) if dest.kind != "email" else "")
        for value in list(out):  # the path and query of a URL are what a Slack URL's secret is
            if "://" in value:
                parts = urlsplit(value)
                out += [p for p in (parts.path, parts.query, parts.path.rsplit("/", 1)[-1]) if p and len(p) >= 6]
                # a receiver's error may echo one query value (?sig=...) or the basic-auth password
                out += [v for _, v in parse_qsl(parts.query) if len(v) >= 6]
                with contextlib.suppress(ValueError):
                    if parts.password:
                        out.append(unquote(parts.password))
                        out.append(parts.password)
                    if parts.password:  # sent as `Authorization: Basic ...`, which a server may echo back
                        out.append(_b64(f"{unquote(parts.username or '')}:{unquote(parts.password)}"))
        if dest.kind == "email" and dest.password_env and self.env.get(dest.password_env):
            pw = str(self.env[dest.password_env])  # AUTH PLAIN / LOGIN send it base64-encoded
            out += [_b64(pw), _b64(f"\0{dest.username or ''}\0{pw}")]
        return sorted({v for v in out if v}, key=len, reverse=True)

    def send_once(self, dest: Destination, out: Outgoing, cfg: AlertsConfig, timeout_s: float) -> None:
        if dest.kind == "email":
            smtp = self.smtp(dest)
            send_smtp(smtp, dest.to, out, min(timeout_s, smtp.timeout_s or timeout_s))
            return
        body = out.slack if dest.kind == "slack" else out.webhook
        post_json(self.url(dest), body, timeout_s=timeout_s, max_bytes=cfg.max_response_bytes,
                  headers=dest.headers if dest.kind == "webhook" else None)


def _bounded_smtp_hook(conn_id: str, timeout_s: float, clients: list[smtplib.SMTP]) -> Any:
    """The SMTP provider's SmtpHook held to one request of a delivery round: `timeout_s` per
    socket operation instead of the connection's (default 30 s), no reconnect loop of its own
    (default 5; `deliver` retries within the round), and each client it builds put in `clients`
    before it connects, so a watchdog can cut a greeting that drips."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    class BoundedSmtpHook(SmtpHook):
        @property
        def timeout(self) -> int:
            return max(1, min(super().timeout, math.ceil(timeout_s)))

        @property
        def smtp_retry_limit(self) -> int:
            return 0

        def _build_client(self) -> smtplib.SMTP:
            kwargs = self._build_client_kwargs(is_async=False)
            host, port = kwargs.pop("host"), kwargs.pop("port", 0)
            client = (smtplib.SMTP_SSL if self.use_ssl else smtplib.SMTP)(**kwargs)
            clients.append(client)
            client.connect(host, port)
            return client

    return BoundedSmtpHook(smtp_conn_id=conn_id)


class AirflowTransport(PlainTransport):
    """Inside an Airflow task: the providers' hooks for Slack and SMTP connections."""

    def send_once(self, dest: Destination, out: Outgoing, cfg: AlertsConfig, timeout_s: float) -> None:
        if dest.conn_id and dest.kind == "slack":
            from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook

            # The hook reads the connection into the webhook URL (token, host, schema as the
            # provider defines them); the POST itself is the bounded one every webhook gets:
            # slack_sdk's client reads any answer whole, however large or slowly it drips.
            try:
                url = SlackWebhookHook(slack_webhook_conn_id=dest.conn_id).get_conn().url
            except Exception as exc:
                raise DeliveryError(self._hook_error("Slack", exc)) from None
            try:
                post_json(_http_url(url, f"the URL of Airflow connection {dest.conn_id!r}"), out.slack,
                          timeout_s=timeout_s, max_bytes=cfg.max_response_bytes)
            except DeliveryError as exc:
                raise type(exc)(f"Slack hook: {exc}") from None
            return
        if dest.conn_id and dest.kind == "email" and not dest.host:
            clients: list[smtplib.SMTP] = []
            late = threading.Event()

            def cut() -> None:  # as in send_smtp: the whole exchange within timeout_s
                late.set()
                for client in clients:
                    with contextlib.suppress(OSError, AttributeError):
                        if client.sock is not None:
                            client.sock.shutdown(socket.SHUT_RDWR)

            watchdog = threading.Timer(timeout_s, cut)
            watchdog.daemon = True
            watchdog.start()
            try:
                with _bounded_smtp_hook(dest.conn_id, timeout_s, clients) as hook:
                    # SmtpHook sends HTML: the plain text, preformatted
                    hook.send_email_smtp(to=list(dest.to), subject=out.subject, from_email=dest.sender,
                                         html_content=f"<pre>{html.escape(out.text)}</pre>",
                                         custom_headers={"X-Brandmon-Alert": one_line(out.alert_id)})
            except Exception as exc:
                if late.is_set():
                    raise DeliveryError(f"SMTP hook: exchange not complete within {timeout_s:.3g} s") from None
                raise DeliveryError(self._hook_error("SMTP", exc)) from None
            finally:
                watchdog.cancel()
            return
        super().send_once(dest, out, cfg, timeout_s)

    @staticmethod
    def _hook_error(what: str, exc: BaseException) -> str:
        status = None
        text = str(exc)
        if "Status Code:" in text:  # the Slack hook's "Response body: ..., Status Code: 500"
            status = text.rsplit("Status Code:", 1)[1].strip().split()[0].strip(".,")
        if status:
            return f"{what} hook: HTTP {status}"
        reason = _reason(exc)
        if reason != type(exc).__name__:
            return f"{what} hook: cannot connect: {reason}"
        first = text.strip().splitlines()[0][:200] if text.strip() else ""
        return f"{what} hook: {type(exc).__name__}" + (f": {first}" if first else "")


@dataclass
class Outcome:
    ok: bool
    requests: int
    error: str | None = None
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def deliver(transport: PlainTransport, dest: Destination, out: Outgoing, cfg: AlertsConfig, *,
            sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> Outcome:
    """Up to `cfg.retries` requests with exponential backoff, all within `cfg.max_total_s`."""
    start = clock()
    wait = cfg.backoff_s
    secrets = transport.secrets(dest)
    errors: list[str] = []
    tries = 0
    while tries < cfg.retries:
        remaining = cfg.max_total_s - (clock() - start)
        if remaining <= 0:
            break
        tries += 1
        try:
            transport.send_once(dest, out, cfg, max(0.1, min(cfg.timeout_s, remaining)))
            return Outcome(True, tries, None, clock() - start, errors)
        except SetupError as exc:
            errors.append(scrub(str(exc), secrets))
            return Outcome(False, 0, errors[-1], clock() - start, errors)
        except DeliveryError as exc:
            errors.append(scrub(str(exc), secrets))
        except Exception as exc:  # a bug or an unexpected library error: still never fatal
            errors.append(scrub(f"{type(exc).__name__}: {str(exc)[:200]}", secrets))
        log.info("alert %s -> %s: try %d failed: %s", out.alert_id, dest.name, tries, errors[-1])
        if tries >= cfg.retries or clock() - start + wait >= cfg.max_total_s:
            break
        sleep(wait)
        wait *= 2
    summary = f"{errors[-1]} (after {tries} request(s))" if errors else "no time left to try"
    return Outcome(False, tries, summary, clock() - start, errors)
