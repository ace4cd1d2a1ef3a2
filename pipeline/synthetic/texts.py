"""Post text for the synthetic feed: templates per language, brand mention forms, near-misses.

Mention forms are the spellings a case/diacritics-insensitive whole-word matcher must catch
(`ACME`, `Acmé`, `#acme`, `Acme One`, `acme corp`); near-misses are the ones it must not
(`acmes`, `Acmeville`, `globexcorp`, `#acmefans`).
"""

from __future__ import annotations

import random
from typing import Any

LANGS = ("en", "fr", "de", "es", "pt", "ja")
LANG_WEIGHTS = (55, 12, 10, 10, 8, 5)

MENTION: dict[str, tuple[str, ...]] = {
    "en": (
        "Just got my new {m} and I love it",
        "Anyone else having trouble with {m} today?",
        "{m} customer support sorted it out in five minutes",
        "Thinking of switching to {m}, thoughts?",
        "Not impressed by {m} lately",
        "Can't believe the price of {m}",
        "Saw a huge {m} billboard on the way to work",
        "{m} keeps getting better",
        "Is {m} down for anyone else?",
        "Unboxing day: {m}!",
        "{m}'s new ad is everywhere",
        "honestly (and I mean it) {m} saved my week",
    ),
    "fr": (
        "Je viens d'acheter {m}, franchement top",
        "Quelqu'un a déjà essayé {m} ?",
        "Le service client de {m} est vraiment lent",
        "J'hésite encore avec {m}",
    ),
    "de": (
        "Hat jemand Erfahrung mit {m}?",
        "Heute ist mein {m} angekommen",
        "Der Support von {m} war super",
        "Schon wieder Ärger mit {m}",
    ),
    "es": (
        "Me encanta {m}",
        "¿Alguien sabe si {m} tiene ofertas?",
        "Otra vez problemas con {m}",
        "Por fin llegó mi {m}",
    ),
    "pt": (
        "Comprei {m} ontem e estou gostando",
        "Alguém já usou {m}?",
        "O atendimento da {m} foi ótimo",
        "De novo problemas com {m}",
    ),
    "ja": (
        "{m} の新製品を買いました",
        "今日 {m} の広告を見た",
        "{m} 最高です",
    ),
}

NEUTRAL: dict[str, tuple[str, ...]] = {
    "en": (
        "Lovely morning for a walk",
        "Coffee first, then emails",
        "Traffic is terrible again",
        "Who else is watching the match tonight?",
        "New recipe turned out great",
        "Rainy day, staying in",
        "Finally finished that book",
        "Weekend plans: nothing at all",
        "Look what I found today",
        "Spotted this on my way home",
        "Guess where I am",
        "This made my day",
        "My cat has opinions about Mondays",
    ),
    "fr": (
        "Belle journée pour marcher",
        "Encore des bouchons ce matin",
        "Regardez ce que j'ai trouvé",
    ),
    "de": ("Schönes Wetter heute", "Endlich Wochenende", "Schaut mal, was ich gefunden habe"),
    "es": ("Qué día tan bonito", "Otra vez tráfico", "Mirad lo que encontré hoy"),
    "pt": ("Que dia lindo", "Trânsito horrível hoje", "Olha o que eu achei"),
    "ja": ("今日はいい天気", "週末が楽しみ", "これ見て"),
}

TAGS = ("#monday", "#photo", "#weekend", "#tech", "#deals", "#coffee", "#travel")
ACCENTS = {"a": "á", "e": "é", "i": "í", "o": "ö", "u": "ü"}


def _accented(word: str) -> str:
    """The word with its last vowel (not the first letter) accented: Acme -> Acmé."""
    for i in range(len(word) - 1, 0, -1):
        if word[i].lower() in ACCENTS:
            acc = ACCENTS[word[i].lower()]
            return word[:i] + (acc.upper() if word[i].isupper() else acc) + word[i + 1 :]
    return word


def mention_forms(brand: dict[str, Any]) -> list[tuple[str, str | None, int]]:
    """(text, product name or None, weight) for every way a post may name `brand`."""
    name = brand["name"]
    kw = (brand.get("keywords") or [name.lower()])[0]
    forms: list[tuple[str, str | None, int]] = [
        (name, None, 30),
        (kw.lower(), None, 8),
        (name.upper(), None, 8),
        (_accented(name), None, 6),
        (_accented(name.upper()), None, 2),
    ]
    forms += [(f"#{t}", None, 10) for t in brand.get("hashtags") or []]
    forms += [(f"#{t.title()}", None, 4) for t in brand.get("hashtags") or []]
    forms += [(a.title(), None, 4) for a in brand.get("aliases") or []]
    for p in brand.get("products") or []:
        forms.append((p["name"], p["name"], 8))
        forms.append((p["name"].lower(), p["name"], 3))
    return forms


def near_miss_forms(brand: dict[str, Any]) -> list[str]:
    """Words that contain a keyword but are not it: a whole-word matcher must skip them."""
    kw = (brand.get("keywords") or [brand["name"].lower()])[0]
    return [
        f"{kw}s",
        f"{kw.title()}ville",
        f"{kw}corp",
        f"super{kw}",
        f"#{kw}fans",
        f"{kw.title()}ian",
    ]


def pick_lang(r: random.Random) -> str:
    return r.choices(LANGS, weights=LANG_WEIGHTS)[0]


def mention_text(r: random.Random, lang: str, form: str, second: str | None = None) -> str:
    text = r.choice(MENTION[lang]).format(m=form)
    if second is not None:
        text = f"{form} vs {second}? {r.choice(NEUTRAL[lang])}"
    if r.random() < 0.2:
        text += " " + r.choice(TAGS)
    return text


def neutral_text(r: random.Random, lang: str) -> str:
    text = r.choice(NEUTRAL[lang])
    if r.random() < 0.2:
        text += " " + r.choice(TAGS)
    return text
