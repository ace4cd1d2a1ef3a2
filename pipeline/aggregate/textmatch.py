"""Text mentions: compile the brand catalogue into a matcher and find brand/product hits in text.

Pure functions, no I/O. Matching is case- and diacritics-insensitive (NFKD, casefold, combining
marks stripped, the same normalisation on both sides), on whole words in any script:

* a term must not touch a letter, digit, ``_`` or spacing mark of a space-delimited script on
  either side (so ``acme`` matches ``Acmé!``, ``#acme`` and ``acme's`` but not ``acmes`` or
  ``superacme``). Scripts written without spaces (Han, Kana, Hangul, Thai, Lao, Khmer,
  Myanmar) have no word boundary to test, so a term in or next to them matches as a substring:
  ``アクメ`` is found in ``アクメの新製品`` and ``acme`` in ``我爱acme``;
* hashtags (``#acme``) and accounts (``@acme``) match only with their sigil, followed by a word
  boundary (``#acme`` does not match ``#acmefans``; ``@acme`` matches ``@acme@mastodon.social``);
* multi-word phrases match across any run of spaces, hyphens or underscores
  (``acme corp`` = ``Acme-Corp`` = ``ACME  corp``).

Exclusion keywords are post-level, per brand: a text that contains one of a brand's
`exclude` terms mentions neither that brand nor its products (the usual "AND NOT" of
social-listening tools), whatever else it says.

A product hit implies a brand hit: `Matcher.match` returns one brand-level `Hit` (product
None) per mentioned brand carrying every matched term, plus one `Hit` per mentioned product.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache

from pipeline.settings import Brand

# Scripts written without spaces between words: no word boundary can be tested next to them.
_NOSPACE_RANGES = (
    "\u0e00-\u0e7f"  # Thai
    "\u0e80-\u0eff"  # Lao
    "\u1000-\u109f"  # Myanmar
    "\u1100-\u11ff"  # Hangul Jamo (NFKD splits Hangul syllables into these)
    "\u1780-\u17ff"  # Khmer
    "\u2e80-\u2fdf"  # CJK radicals
    "\u3005-\u3007\u3021-\u3029\u3038-\u303c"  # CJK ideographic marks and numerals
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3130-\u318f"  # Hangul compatibility Jamo
    "\u31f0-\u31ff"  # Katakana phonetic extensions
    "\u3400-\u4dbf"  # CJK extension A
    "\u4e00-\u9fff"  # CJK unified ideographs
    "\ua960-\ua97f\uac00-\ud7ff"  # Hangul
    "\uf900-\ufaff"  # CJK compatibility ideographs
    "\uff66-\uff9f"  # halfwidth Katakana
    "\U00020000-\U0003ffff"  # CJK extensions B..
)
_NOSPACE_RE = re.compile(f"[{_NOSPACE_RANGES}]")

# Separators inside a multi-word phrase: spaces, hyphens/dashes, underscores.
_SEP_CHARS = r"\s\-\u2010-\u2015_\u00b7"
_SEP = f"[{_SEP_CHARS}]+"
_SEP_RE = re.compile(_SEP)


@cache
def _mark_tables() -> tuple[dict[int, None], str]:
    """(translate table deleting non-spacing/enclosing marks, regex class of spacing marks).

    Scans the code points up to U+2FFFF once per process (~0.03 s): every combining mark lives
    below that (planes 2-3 hold only ideographs, plane 14's variation selectors are handled as
    format characters by NFKD users anyway).
    """
    strip: dict[int, None] = {}
    spacing: list[str] = []
    for cp in range(0x30000):
        cat = unicodedata.category(chr(cp))
        if cat in ("Mn", "Me"):
            strip[cp] = None
        elif cat == "Mc":
            spacing.append(chr(cp))
    # Variation selectors (plane 14) are Mn too: strip them so emoji/ideograph variants compare equal.
    for cp in range(0xE0100, 0xE01F0):
        strip[cp] = None
    cls = "".join(re.escape(c) for c in spacing)
    return strip, cls


def normalize(text: str) -> str:
    """Case- and diacritics-free form of `text`: NFKD, casefold, NFKD again, marks removed."""
    if text.isascii():
        return text.lower()
    strip, _ = _mark_tables()
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    return text.translate(strip)


def canonical(text: str) -> str:
    """A normalised term or matched span with its phrase separators collapsed to one space."""
    return _SEP_RE.sub(" ", normalize(text)).strip()


@dataclass(frozen=True)
class Hit:
    """A brand (product None) or one of its products mentioned in a text, with the terms found."""

    brand: str
    product: str | None
    terms: tuple[str, ...]


@dataclass(frozen=True)
class _Term:
    display: str  # as configured, with its sigil: "acme corp", "#acme", "@acme"
    product: str | None


def _term_pattern(term: str) -> str | None:
    """Regex for one normalised term with whole-word guards on its word-character ends."""
    body = canonical(term)
    if not body:
        return None
    _, marks = _mark_tables()
    # A boundary char is a word char (letter, digit, _) of a spaced script, or a spacing mark.
    not_word_before = f"(?<![^\\W{_NOSPACE_RANGES}])" + (f"(?<![{marks}])" if marks else "")
    not_word_after = f"(?![^\\W{_NOSPACE_RANGES}])" + (f"(?![{marks}])" if marks else "")
    parts = [re.escape(w) for w in body.split(" ")]
    core = _SEP.join(parts)
    first, last = body[0], body[-1]
    left = ""
    if first in "#@":
        left = not_word_before  # the sigil must start a token: "info@acme.com" is no account
    elif _is_word_char(first) and not _NOSPACE_RE.match(first):
        left = not_word_before
    right = not_word_after if _is_word_char(last) and not _NOSPACE_RE.match(last) else ""
    return left + core + right


def _is_word_char(ch: str) -> bool:
    return ch == "_" or unicodedata.category(ch)[0] in "LNM"


def _clean(values: Iterable[str], sigil: str = "") -> list[str]:
    """Configured terms, trimmed, with hashtags/accounts given their sigil exactly once."""
    out = []
    for v in values:
        v = str(v).strip()
        if sigil:
            v = sigil + v.lstrip(sigil)
        if v and v != sigil:
            out.append(v)
    return out


class _BrandMatcher:
    """The compiled terms of one brand: its own, its products', and its exclusions."""

    def __init__(self, brand: Brand) -> None:
        self.name = brand.name
        terms: list[_Term] = []
        own = _clean(brand.keywords) + _clean(brand.aliases)
        if not own and not brand.hashtags and not brand.accounts:
            own = [brand.name]  # a brand with no terms at all is matched by its name
        terms += [_Term(t, None) for t in own]
        terms += [_Term(t, None) for t in _clean(brand.hashtags, "#")]
        terms += [_Term(t, None) for t in _clean(brand.accounts, "@")]
        for p in brand.products:
            p_terms = _clean(p.keywords) + _clean(p.hashtags, "#")
            if not p_terms:
                p_terms = [p.name]
            terms += [_Term(t, p.name) for t in p_terms]
        self.by_canonical: dict[str, list[_Term]] = {}
        for t in terms:
            self.by_canonical.setdefault(canonical(t.display), []).append(t)
        self.pattern = _alternation(self.by_canonical)
        # Cheap substring pre-check: every match contains its term's first word literally.
        self.needles = tuple(sorted({c.split(" ")[0].lstrip("#@") or c for c in self.by_canonical}))
        self.exclude = _alternation({canonical(t): [] for t in _clean(brand.exclude)})

    def match(self, norm: str) -> Hit | list[Hit] | None:
        if self.pattern is None or not any(n in norm for n in self.needles):
            return None
        found: list[_Term] = []
        for m in self.pattern.finditer(norm):
            found += self.by_canonical.get(canonical(m.group(1)), [])
        if not found:
            return None
        if self.exclude is not None and self.exclude.search(norm):
            return None
        hits = [Hit(self.name, None, tuple(sorted({t.display for t in found})))]
        products: dict[str, set[str]] = {}
        for t in found:
            if t.product is not None:
                products.setdefault(t.product, set()).add(t.display)
        hits += [Hit(self.name, p, tuple(sorted(ts))) for p, ts in sorted(products.items())]
        return hits


def _alternation(canonical_terms: dict[str, list[_Term]] | dict[str, list]) -> re.Pattern[str] | None:
    """One regex finding every start position of any term, longest term first at each start.

    The alternation sits in a lookahead so that overlapping terms starting at different
    positions ("acme corp" and "corp x") are all reported.
    """
    pats = []
    for body in sorted(canonical_terms, key=lambda s: (-len(s), s)):
        p = _term_pattern(body)
        if p:
            pats.append(p)
    if not pats:
        return None
    return re.compile("(?=(" + "|".join(f"(?:{p})" for p in pats) + "))")


class Matcher:
    """The whole catalogue compiled once; `match(text)` is then safe to call on many posts."""

    def __init__(self, brands: Sequence[Brand]) -> None:
        self.brands = [_BrandMatcher(b) for b in brands]

    def match(self, text: str | None) -> list[Hit]:
        """Brand-level and product-level hits in `text`, sorted by brand then product."""
        if not text:
            return []
        norm = normalize(text)
        hits: list[Hit] = []
        for bm in self.brands:
            found = bm.match(norm)
            if found:
                hits += found  # type: ignore[arg-type]
        return hits


def compile_catalogue(brands: Sequence[Brand]) -> Matcher:
    """The matcher for `settings.brands` (compile once per job, not per post)."""
    return Matcher(brands)


if __name__ == "__main__":  # pragma: no cover - manual check: python -m pipeline.aggregate.textmatch "text"
    from pipeline.settings import load_settings

    m = compile_catalogue(load_settings().brands)
    for line in sys.argv[1:]:
        print(line, "->", m.match(line))
