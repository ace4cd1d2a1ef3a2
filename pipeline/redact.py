"""The one redactor for URLs and free text shown to people (status, errors, logs).

Why one: secrets reach output as a URL's password (`postgresql://u:pw@h/db`), as a query
parameter (`?password=...`, `?X-Amz-Signature=...`), inside an S3 endpoint's userinfo or as
a bare `password=...` in a driver's message. Each place used to hide its own subset.

A password may hold unencoded `#`, `@`, `/`, `?` or `:` (people paste them), which makes a URL
ambiguous; the rule here hides more rather than less: everything between `scheme://user:` and
the LAST `@` of the URL is the password. Query and fragment parameters whose name looks like a
secret (password, secret, token, key, sig, credential, auth; any case, percent-decoded) keep
their name and lose their value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

MASK = "***"
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>.*)$", re.S)
SECRET_NAME = re.compile(r"(?i)pass|pwd|secret|token|key|sig|credential|auth|session|cookie|private")
# the start of a `name=value` pair in a query or fragment (after ?, &, ; or #)
_PARAM_NAME = re.compile(r"[?&;#](?P<name>[^=&;#?\s]*)=")
# a secret's value runs to the next `&` (an unencoded `#`, `;` or space in it is hidden too)
_SECRET_VALUE = re.compile(r"[^&]*")
# a URL inside free text: up to whitespace or an angle bracket (a quote may be in a password)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s<>]+")
# an e-mail address (a personal identifier, not a secret: hidden where text is kept as evidence)
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
EMAIL_MASK = "…@…"
_KEY_VALUE = re.compile(
    r"(?i)\b(?P<key>[A-Za-z_]*(?:password|passwd|pwd|secret|token|api_?key|access_key|authorization|credential)s?)"
    r"(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)(?P<value>[^\s'\",;&]+)"
)


def _secret_param_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the values of secret-named parameters in `text`."""
    spans = []
    pos = 0
    while (m := _PARAM_NAME.search(text, pos)) is not None:
        pos = m.end()
        if SECRET_NAME.search(unquote(m["name"])):
            end = _SECRET_VALUE.match(text, pos).end()  # type: ignore[union-attr]
            if end > pos:
                spans.append((pos, end))
            pos = end
    return spans


def redact_url(url: str) -> str:
    """`url` without its password (userinfo) or the values of secret-named parameters.

    The parts to hide are found on the URL as given, each on its own (the password: from after
    `user:` to the last `@`; each secret parameter's value: to the next `&`), and their union is
    replaced, so a `@` or `?password=` inside one cannot shift the other and leave a piece shown.
    """
    if not isinstance(url, str):
        url = str(url)
    m = _SCHEME.match(url)
    start = m.end("scheme") if m else 0
    hidden = [False] * len(url)
    for a, b in _secret_param_spans(url[start:]):
        hidden[start + a : start + b] = [True] * (b - a)
    if m is not None:
        rest = m["rest"]
        at = rest.rfind("@")
        colon = rest.find(":", 0, at) if at >= 0 else -1
        if colon >= 0:
            user = rest[:colon]
            first = start + (0 if any(c in user for c in "/?#") else colon + 1)  # not a user name: hide it too
            hidden[first : start + at] = [True] * (start + at - first)
    elif "@" in url:  # a mistyped URL (`postgresql:/u:pw@h`, `u:pw@h`): still hide what could be a password
        at = url.rfind("@")
        colon = url.find(":", 0, at)
        if colon >= 0:
            hidden[colon + 1 : at] = [True] * (at - colon - 1)
    out: list[str] = []
    i = 0
    while i < len(url):
        if hidden[i]:
            while i < len(url) and hidden[i]:
                i += 1
            out.append(MASK)
        else:
            out.append(url[i])
            i += 1
    return "".join(out)


def scrub_emails(text: str) -> str:
    """`text` with every e-mail address replaced by EMAIL_MASK."""
    return _EMAIL.sub(EMAIL_MASK, text)


def url_passwords(url: str | None) -> list[str]:
    """The password of a URL's userinfo, as written and percent-decoded (none: []): known
    secrets to scrub from messages that may quote them in either form."""
    try:
        raw = urlsplit(url or "").password or ""
    except ValueError:
        return []
    return [v for v in {raw, unquote(raw)} if v]


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (an error message, a log line) with every URL redacted, `password=...`-like
    pairs masked and each known secret value (4+ characters) replaced. In free text a URL ends
    at whitespace, so a password with a space in it is only hidden if passed in `secrets`."""
    if not isinstance(text, str):
        text = str(text)
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{MASK}" if m["value"] != MASK else m.group(0), text)
