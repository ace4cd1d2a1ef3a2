from __future__ import annotations

import hashlib

from pipeline.detector.split import split_of, split_point


def _sha(i: int) -> str:
    return hashlib.sha256(f"image-{i}".encode()).hexdigest()


def test_split_is_a_pure_function_of_the_content_hash():
    shas = [_sha(i) for i in range(500)]
    first = {s: split_of(s) for s in shas}
    # Growing the data (and shuffling it) never moves an image that was already assigned.
    grown = [_sha(i) for i in range(2000)][::-1]
    second = {s: split_of(s) for s in grown}
    assert all(second[s] == first[s] for s in shas)


def test_split_fractions_are_roughly_as_configured():
    shas = [_sha(i) for i in range(4000)]
    counts = {k: 0 for k in ("train", "val", "test")}
    for s in shas:
        counts[split_of(s)] += 1
    assert 0.66 < counts["train"] / 4000 < 0.74
    assert 0.12 < counts["val"] / 4000 < 0.18
    assert 0.12 < counts["test"] / 4000 < 0.18
    assert all(0 <= split_point(s) < 1 for s in shas[:50])


def test_split_is_not_the_hash_order():
    # A salted hash: sorting by sha256 (as detect batches do) does not group one split.
    shas = sorted(_sha(i) for i in range(300))
    first_hundred = {split_of(s) for s in shas[:100]}
    assert first_hundred == {"train", "val", "test"}
