"""The YAML `alerts:` section, checked into typed rules and destinations.

Why strict: a typo in an alert rule would otherwise mean alerts silently never fire, so
unknown keys, unknown kinds and bad values are one clear `ConfigError` line at start-up.
Secrets are never in the YAML: a destination names the environment variable (`url_env`,
`password_env`) or the Airflow connection (`conn_id`) that holds them; a literal `url:` or
`password:` key is refused with the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import ConfigError

RULE_KINDS = ("spike", "share_of_voice", "wow")
DEST_KINDS = ("webhook", "slack", "email")
SOURCES = ("text", "image", "both", "any")
EACH = "each"  # brand/product/platform: one alert key per value instead of the total

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SECRET_KEYS = {"url": "url_env", "webhook_url": "url_env", "password": "password_env", "token": "url_env"}


@dataclass(frozen=True)
class Destination:
    """Where alerts go. Secrets are looked up at send time, never stored here."""

    name: str
    kind: str  # webhook | slack | email
    url_env: str | None = None  # webhook/slack: env var holding the URL
    conn_id: str | None = None  # Airflow connection (http / slackwebhook / smtp)
    # email
    host: str | None = None
    port: int = 587
    starttls: bool = True
    username: str | None = None
    password_env: str | None = None
    sender: str | None = None  # the From address (`from:` in YAML)
    to: tuple[str, ...] = ()
    headers: dict[str, str] = field(default_factory=dict)  # webhook: extra non-secret headers


@dataclass(frozen=True)
class Rule:
    """One alert rule; `brand`/`product`/`platform` are a name, '*' (the total) or 'each'."""

    name: str
    kind: str  # spike | share_of_voice | wow
    brand: str = EACH
    product: str = "*"
    platform: str = "*"
    source: str = "any"
    destinations: tuple[str, ...] = ()
    min_posts: int = 5
    min_zscore: float | None = None  # spike: None = the `spike` flag of mention_daily
    above: float | None = None  # share_of_voice: entering >= above; wow: entering >= above
    below: float | None = None  # share_of_voice: entering <= below; wow: entering <= -below


@dataclass(frozen=True)
class AlertsConfig:
    rules: tuple[Rule, ...] = ()
    destinations: tuple[Destination, ...] = ()
    late_after_days: int = 2  # a day older than this (vs the run date) is sent marked late
    max_age_days: int = 60  # days older than this are recorded as skipped, never sent
    max_attempts: int = 5  # delivery rounds (aggregate runs) per alert and destination
    retries: int = 3  # requests per delivery round, with exponential backoff
    backoff_s: float = 1.0  # first wait; doubles after each failed request
    max_total_s: float = 30.0  # bound on one delivery round (all its requests and waits)
    timeout_s: float = 10.0  # bound on each request (connect, read, and the whole body)
    max_response_bytes: int = 65536
    lease_s: float = 600.0  # a 'sending' row older than this was left by a crash: retried
    report_base_url: str | None = None  # public URL of the lake, for report links

    def rule(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        known = ", ".join(r.name for r in self.rules) or "none configured"
        raise ConfigError(f"unknown alert rule {name!r} (configured: {known})")

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"unknown alert destination {name!r}")

    def rule_destinations(self, rule: Rule) -> list[Destination]:
        return [self.destination(n) for n in rule.destinations]


def _where(where: str, key: str) -> str:
    return f"{where}.{key}"


def _check_keys(raw: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in raw:
        if key in _SECRET_KEYS and key not in allowed:
            raise ConfigError(
                f"{where}: `{key}` would put a secret in the YAML; put it in an environment variable "
                f"and name it with `{_SECRET_KEYS[key]}:` (or use an Airflow connection with `conn_id:`)"
            )
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key `{key}`; known: {', '.join(sorted(allowed))}")


def _str(raw: dict[str, Any], key: str, where: str, default: str | None = None) -> str | None:
    value = raw.get(key, default)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{_where(where, key)} must be a non-empty string, got {value!r}")
    return value.strip()


def _env_name(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = _str(raw, key, where)
    if value is not None and not _ENV.match(value):
        raise ConfigError(
            f"{_where(where, key)} must name an environment variable (e.g. SLACK_WEBHOOK_URL), "
            "not hold the secret itself"
        )
    return value


def _num(raw: dict[str, Any], key: str, where: str, default: Any, kind: type, low: float) -> Any:
    value = raw.get(key, default)
    if value is None:
        return None
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)  # NaN compares false with everything: a rule that never fires
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or value < low:
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"{_where(where, key)} must be {what} of at least {low:g}, got {value!r}")
    return kind(value)


def _bool(raw: dict[str, Any], key: str, where: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{_where(where, key)} must be true or false, got {value!r}")
    return value


def _parse_destination(name: Any, raw: Any, where: str) -> Destination:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}: destination name {name!r} must be letters, digits, '.', '-' or '_'")
    where = f"{where}.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with `kind:` (webhook, slack or email)")
    kind = raw.get("kind")
    if kind not in DEST_KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(DEST_KINDS)}, got {kind!r}")
    conn_id = _str(raw, "conn_id", where)
    if kind in ("webhook", "slack"):
        allowed = {"kind", "url_env", "conn_id"} | ({"headers"} if kind == "webhook" else set())
        _check_keys(raw, allowed, where)
        url_env = _env_name(raw, "url_env", where)
        if not url_env and not conn_id:
            raise ConfigError(f"{where} needs `url_env:` (the environment variable holding the URL) or `conn_id:`")
        headers = raw.get("headers") or {}
        if not isinstance(headers, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ConfigError(f"{where}.headers must be a mapping of header names to strings")
        for h, v in headers.items():
            if _CONTROL.search(h + v):
                raise ConfigError(f"{where}.headers.{h.strip()}: a header name or value cannot hold a line break")
            if h.lower() in ("authorization", "cookie", "x-api-key") or "token" in h.lower():
                raise ConfigError(f"{where}.headers.{h} looks like a secret; secrets do not go in the YAML")
        return Destination(name=name, kind=kind, url_env=url_env, conn_id=conn_id, headers=dict(headers))
    allowed = {"kind", "conn_id", "host", "port", "starttls", "username", "password_env", "from", "to"}
    _check_keys(raw, allowed, where)
    to = raw.get("to")
    if isinstance(to, str):
        to = [to]
    if not isinstance(to, list) or not to or not all(isinstance(t, str) and "@" in t for t in to):
        raise ConfigError(f"{where}.to must be an email address or a list of them")
    # a line break in an address would be a header of its own (`Bcc: ...`); mail refuses it at send
    for key, value in (("to", " ".join(to)), ("from", raw.get("from")), ("username", raw.get("username"))):
        if isinstance(value, str) and _CONTROL.search(value.strip()):
            raise ConfigError(f"{where}.{key} cannot hold a line break or other control character")
    host = _str(raw, "host", where)
    if not host and not conn_id:
        raise ConfigError(f"{where} needs `host:` (the SMTP server) or `conn_id:` (an Airflow smtp connection)")
    sender = _str(raw, "from", where)
    if not sender and not conn_id:
        raise ConfigError(f"{where} needs `from:` (the sender address)")
    return Destination(
        name=name, kind=kind, conn_id=conn_id, host=host, port=_num(raw, "port", where, 587, int, 1),
        starttls=_bool(raw, "starttls", where, True), username=_str(raw, "username", where),
        password_env=_env_name(raw, "password_env", where), sender=sender, to=tuple(t.strip() for t in to),
    )


_RULE_KEYS = {"name", "kind", "brand", "product", "platform", "source", "destinations", "min_posts",
              "min_zscore", "above", "below"}


def _parse_rule(raw: Any, i: int, where: str, dest_names: list[str]) -> Rule:
    where = f"{where}.rules[{i}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with `name:` and `kind:`")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where}.name must be letters, digits, '.', '-' or '_' (got {name!r})")
    where = f"{where} ({name})"
    _check_keys(raw, _RULE_KEYS, where)
    kind = raw.get("kind")
    if kind not in RULE_KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(RULE_KINDS)}, got {kind!r}")
    source = raw.get("source", "any")
    if source not in SOURCES:
        raise ConfigError(f"{where}.source must be one of {', '.join(SOURCES)}, got {source!r}")
    dests = raw.get("destinations")
    if dests is None:
        dests = list(dest_names)
    if isinstance(dests, str):
        dests = [dests]
    if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
        raise ConfigError(f"{where}.destinations must be a list of destination names")
    unknown = [d for d in dests if d not in dest_names]
    if unknown:
        raise ConfigError(f"{where}: unknown destination(s) {', '.join(unknown)}; "
                          f"defined: {', '.join(dest_names) or 'none'}")
    if not dests:
        raise ConfigError(f"{where} has no destination; define some under alerts.destinations")
    above = _num(raw, "above", where, None, float, 0)
    below = _num(raw, "below", where, None, float, 0)
    if kind == "share_of_voice":
        for k, v in (("above", above), ("below", below)):
            if v is not None and v > 1:
                raise ConfigError(f"{where}.{k} is a share of voice, between 0 and 1 (got {v:g})")
    if kind in ("share_of_voice", "wow") and above is None and below is None:
        example = "above: 0.4" if kind == "share_of_voice" else "above: 0.5 (a 50% rise)"
        raise ConfigError(f"{where} needs `above:` and/or `below:`, e.g. {example}")
    if kind == "spike" and (above is not None or below is not None):
        raise ConfigError(f"{where}: a spike rule takes `min_zscore:`, not above/below")
    if kind != "spike" and raw.get("min_zscore") is not None:
        raise ConfigError(f"{where}: `min_zscore` is for spike rules only")
    product = _str(raw, "product", where, "*") or "*"
    if kind == "share_of_voice" and product != "*":
        raise ConfigError(f"{where}: share of voice is per brand; leave `product` out")
    return Rule(
        name=name, kind=kind, brand=_str(raw, "brand", where, EACH) or EACH, product=product,
        platform=_str(raw, "platform", where, "*") or "*", source=source, destinations=tuple(dests),
        min_posts=_num(raw, "min_posts", where, 5, int, 0),
        min_zscore=_num(raw, "min_zscore", where, None, float, 0), above=above, below=below,
    )


_TOP_KEYS = {"rules", "destinations", "late_after_days", "max_age_days", "max_attempts", "retries",
             "backoff_s", "max_total_s", "timeout_s", "max_response_bytes", "lease_s", "report_base_url"}


def parse_alerts(raw: Any, where: str = "alerts") -> AlertsConfig:
    """The `alerts:` mapping as an `AlertsConfig` (empty when absent)."""
    if raw is None:
        return AlertsConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with `destinations:` and `rules:`")
    _check_keys(raw, _TOP_KEYS, where)
    dest_raw = raw.get("destinations") or {}
    if not isinstance(dest_raw, dict):
        raise ConfigError(f"{where}.destinations must be a mapping of name -> destination")
    dests = tuple(_parse_destination(n, d, f"{where}.destinations") for n, d in dest_raw.items())
    names = [d.name for d in dests]
    rules_raw = raw.get("rules") or []
    if not isinstance(rules_raw, list):
        raise ConfigError(f"{where}.rules must be a list of rules")
    rules = tuple(_parse_rule(r, i, where, names) for i, r in enumerate(rules_raw))
    if len({r.name for r in rules}) != len(rules):
        raise ConfigError(f"{where}: rule names must be unique")
    base = _str(raw, "report_base_url", where)
    if base is not None and not base.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.report_base_url must be an http(s) URL, got {base!r}")
    d = AlertsConfig()
    return AlertsConfig(
        rules=rules, destinations=dests,
        late_after_days=_num(raw, "late_after_days", where, d.late_after_days, int, 0),
        max_age_days=_num(raw, "max_age_days", where, d.max_age_days, int, 0),
        max_attempts=_num(raw, "max_attempts", where, d.max_attempts, int, 1),
        retries=_num(raw, "retries", where, d.retries, int, 1),
        backoff_s=_num(raw, "backoff_s", where, d.backoff_s, float, 0),
        max_total_s=_num(raw, "max_total_s", where, d.max_total_s, float, 0.1),
        timeout_s=_num(raw, "timeout_s", where, d.timeout_s, float, 0.1),
        max_response_bytes=_num(raw, "max_response_bytes", where, d.max_response_bytes, int, 1),
        lease_s=_num(raw, "lease_s", where, d.lease_s, float, 1),
        report_base_url=base.rstrip("/") if base else None,
    )


def check_catalogue(cfg: AlertsConfig, catalogue: Mapping[str, Sequence[str]], where: str = "alerts") -> AlertsConfig:
    """`cfg` with each rule's brand and product spelled as in the catalogue (brand -> product
    names). A rule naming a brand or product the catalogue does not have would never fire (the
    day's rows carry catalogue names): one ConfigError line instead of silence."""
    brands = {b.casefold(): b for b in catalogue}
    rules = []
    for i, rule in enumerate(cfg.rules):
        at = f"{where}.rules[{i}] ({rule.name})"
        brand = rule.brand
        if brand != EACH:
            if brand.casefold() not in brands:
                raise ConfigError(f"{at}.brand {brand!r} is not in the catalogue (brands: "
                                  f"{', '.join(catalogue) or 'none'}; or `each`)")
            brand = brands[brand.casefold()]
        product = rule.product
        if product not in ("*", EACH):
            owners = catalogue if brand == EACH else {brand: catalogue[brand]}
            names = {p.casefold(): p for ps in owners.values() for p in ps}
            if product.casefold() not in names:
                known = ", ".join(sorted(names.values())) or "none"
                raise ConfigError(f"{at}.product {product!r} is not a product of {brand if brand != EACH else 'any brand'} "
                                  f"(products: {known}; or `each`, or `*` for the total)")
            product = names[product.casefold()]
        rules.append(dataclasses.replace(rule, brand=brand, product=product))
    return dataclasses.replace(cfg, rules=tuple(rules))
