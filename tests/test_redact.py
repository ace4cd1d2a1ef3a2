"""The URL/text redactor: examples, and a Hypothesis property that every secret part of any
generated URL is gone (userinfo passwords with `#@/?:` in them, secret-named parameters)."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.redact import redact_url, scrub_text

# Secrets are drawn from an alphabet with "Z" in every one; the other parts never hold a "Z",
# so any "Z" in the output is a leak.
SPECIAL = "#@/?:&;=%+ !$'()*,[]~"
secret = st.text(alphabet=string.ascii_lowercase + string.digits + SPECIAL + "Z", min_size=0, max_size=24).map(
    lambda s: f"Z{s}Z")
plain = st.text(alphabet=string.ascii_lowercase + string.digits + "-._", min_size=1, max_size=12)
secret_key = st.sampled_from(["password", "PASSWORD", "PassWord", "sslpassword", "secret", "client_secret",
                              "token", "access_token", "api_key", "apikey", "X-Amz-Signature", "sig",
                              "X-Amz-Credential", "credential", "auth", "pass%77ord", "aws_secret_access_key"])


@st.composite
def urls(draw) -> str:
    scheme = draw(st.sampled_from(["postgresql", "postgresql+psycopg2", "http", "https", "s3", "redis"]))
    user = draw(plain)
    host = draw(plain)
    port = draw(st.one_of(st.none(), st.integers(1, 65535)))
    path = draw(st.lists(plain, max_size=3))
    netloc = host + (f":{port}" if port is not None else "")
    with_password = draw(st.booleans())
    if with_password:
        netloc = f"{user}:{draw(secret)}@{netloc}"
    params = draw(st.lists(st.tuples(plain.filter(lambda k: not any(w in k for w in ("key", "sig", "pass", "pwd",
                                                                                       "auth", "secret", "token"))),
                                     plain), max_size=3))
    secrets_ = [] if with_password else [(draw(secret_key), draw(secret.filter(lambda s: "&" not in s)))]
    secrets_ += draw(st.lists(st.tuples(secret_key, secret.filter(lambda s: "&" not in s)), max_size=2))
    pairs = params + secrets_
    draw(st.randoms()).shuffle(pairs)
    query = "&".join(f"{k}={v}" for k, v in pairs)
    return f"{scheme}://{netloc}/{'/'.join(path)}" + (f"?{query}" if query else "")


@settings(max_examples=500, deadline=None)
@given(urls())
def test_every_secret_part_is_removed(url: str) -> None:
    out = redact_url(url)
    assert "Z" not in out, (url, out)
    assert "***" in out


@settings(max_examples=300, deadline=None)
@given(urls().filter(lambda u: " " not in u), st.text(alphabet=string.ascii_lowercase + " :;,.", max_size=30))
def test_urls_inside_text_are_redacted(url: str, words: str) -> None:
    # in free text a URL ends at whitespace (a password with a space is hidden as a known secret)
    out = scrub_text(f"cannot reach {url}{' ' if words else ''}{words}")
    assert "Z" not in out, (url, out)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_never_raises(value: str) -> None:
    redact_url(value)
    scrub_text(value)


def test_examples() -> None:
    assert redact_url("postgresql://u:pa#ss@h/db") == "postgresql://u:***@h/db"
    assert redact_url("postgresql://u:p@ss/w?rd@h:5432/db?sslmode=require") == "postgresql://u:***@h:5432/db?sslmode=require"
    assert redact_url("postgresql://u@h/db?password=s3cr#t&x=1") == "postgresql://u@h/db?password=***&x=1"
    assert redact_url("http://KEY:SECRET@minio:9000") == "http://KEY:***@minio:9000"
    assert redact_url("https://h/p?X-Amz-Signature=abc&a=b#access_token=t") == "https://h/p?X-Amz-Signature=***&a=b#access_token=***"
    assert redact_url("https://mastodon.social/@someone") == "https://mastodon.social/@someone"  # no password: unchanged
    assert redact_url("sqlite:////var/brandmon.db") == "sqlite:////var/brandmon.db"
    assert scrub_text("auth failed: password=hunter2, token: abc") == "auth failed: password=***, token: ***"
    assert scrub_text("value hunter22 leaked", ["hunter22"]) == "value *** leaked"


def test_a_mistyped_url_still_hides_what_could_be_its_password():
    """No `scheme://` (a slash or colon missing): from the first `:` to the last `@` is hidden."""
    assert redact_url("postgresql:/u:hunter2@db/x") == "postgresql:***@db/x"
    assert redact_url("u:hunter2@db/x") == "u:***@db/x"
    assert redact_url("postgresql+psycopg2:://u:hunter2@db/x") == "postgresql+psycopg2:***@db/x"
    assert redact_url("/var/lake") == "/var/lake"


def test_url_passwords_as_written_and_decoded():
    from pipeline.redact import url_passwords

    assert sorted(url_passwords("http://u:p%40ss@minio:9000")) == ["p%40ss", "p@ss"]
    assert url_passwords("http://u:plain@h") == ["plain"]
    assert url_passwords("http://h:9000") == [] and url_passwords(None) == []
    assert url_passwords("http://[::1") == []  # unparseable: nothing, not an exception


def test_one_email_scrubber_for_excerpts_too():
    from pipeline.redact import scrub_emails
    from pipeline.sources.parsing import scrub_accounts

    assert scrub_emails("mail jane.doe+x@mail.example.org now") == "mail …@… now"
    assert scrub_emails("no address @here") == "no address @here"
    assert "jane" not in scrub_accounts("reach jane.doe@example.com") and "…@…" in scrub_accounts("a@b.example")
