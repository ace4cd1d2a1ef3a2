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
from urllib.parse import unquote

MASK = "***"
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<rest>.*)$", re.S)
SECRET_NAME = re.compile(r"(?i)pass|pwd|secret|token|key|sig|credential|auth|session|cookie|private")
# the start of a `name=value` pair in a query or fragment (after ?, &, ; or #)
_PARAM_NAME = re.compile(r"[?&;#](?P<name>[^=&;#?\s]*)=")
# a secret's value runs to the next `&` (an unencoded `#` or `;` in it is hidden too)
_SECRET_VALUE = re.compile(r"[^&\s]*")
# a URL inside free text: up to whitespace, a quote or an angle bracket
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
_KEY_VALUE = re.compile(
    r"(?i)\b(?P<key>[A-Za-z_]*(?:password|passwd|pwd|secret|token|api_?key|access_key|authorization|credential)s?)"
    r"(?P<sep>\s*[=:]\s*)(?P<quote>['\"]?)(?P<value>[^\s'\",;&]+)"
)


def _mask_params(tail: str) -> str:
    out: list[str] = []
    pos = 0
    while (m := _PARAM_NAME.search(tail, pos)) is not None:
        out.append(tail[pos : m.end()])
        pos = m.end()
        if SECRET_NAME.search(unquote(m["name"])):
            end = _SECRET_VALUE.match(tail, pos).end()  # type: ignore[union-attr]
            if end > pos:
                out.append(MASK)
            pos = end
    out.append(tail[pos:])
    return "".join(out)


def redact_url(url: str) -> str:
    """`url` without its password (userinfo) or the values of secret-named parameters."""
    if not isinstance(url, str):
        url = str(url)
    m = _SCHEME.match(url)
    if m is None:
        return _mask_params(url) if "?" in url or "#" in url else url
    scheme, rest = m["scheme"], m["rest"]
    at = rest.rfind("@")
    if at >= 0:
        userinfo, after = rest[:at], rest[at + 1 :]
        user, colon, _password = userinfo.partition(":")
        if colon:
            if any(c in user for c in "/?#"):  # not a user name: hide all of it
                user = ""
            rest = f"{user}:{MASK}@{after}"
            return scheme + rest[: len(user) + len(MASK) + 2] + _mask_params(after)
    return scheme + _mask_params(rest)


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (an error message, a log line) with every URL redacted, `password=...`-like
    pairs masked and each known secret value (4+ characters) replaced."""
    if not isinstance(text, str):
        text = str(text)
    for value in secrets:
        if value and len(value) >= 4:
            text = text.replace(value, MASK)
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
    return _KEY_VALUE.sub(lambda m: f"{m['key']}{m['sep']}{m['quote']}{MASK}" if m["value"] != MASK else m.group(0), text)
