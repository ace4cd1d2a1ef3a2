"""Train/validation/test assignment from an image's content hash.

Why a hash and not a random shuffle: the set an image belongs to must never change as data
grows or between runs, otherwise a "held-out" photo could have been trained on by an earlier
model. Every crop of a photo follows the photo (the hash is of the whole source image).
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
_SALT = b"brandmon-split-v1:"


def split_point(sha256: str) -> float:
    """A stable number in [0, 1) for an image (salted, so it is unrelated to sha ordering)."""
    digest = hashlib.sha256(_SALT + sha256.encode("ascii")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(sha256: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """"train", "val" or "test" for the image with this content hash."""
    train, val, _test = fractions
    u = split_point(sha256)
    if u < train:
        return "train"
    if u < train + val:
        return "val"
    return "test"
