"""Plain data records that flow between connectors, the loader and the detector."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ImageRef:
    """An image attached to a post: where to fetch it and its alt text."""

    url: str
    alt_text: str | None = None


@dataclass(frozen=True)
class Post:
    """One normalised post, whatever the platform. `author_hash` is a salted hash, never a name."""

    platform: str
    external_id: str
    author_hash: str
    text: str
    posted_at: dt.datetime  # timezone-aware UTC
    lang: str | None = None
    url: str | None = None
    repost_of: str | None = None
    images: tuple[ImageRef, ...] = field(default_factory=tuple)



def hash_author(salt: str, platform: str, author_id: str) -> str:
    """Salted, keyed hash of an author id: stable per installation, not reversible without the salt."""
    import hmac

    return hmac.new(salt.encode(), f"{platform}:{author_id}".encode(), hashlib.sha256).hexdigest()
