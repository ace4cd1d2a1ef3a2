"""FlickrLogos-27 as the detector reads it (skipped where BRANDMON_FL27_DIR is absent).

The full train + evaluate on these photos takes up to 30 minutes on 2 cores, so it lives in
`bench/fl27.py` (figures in bench/results/fl27.txt); this checks the data side it relies on.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest

from pipeline.detector import NO_LOGO
from pipeline.detector.data import SampleSpec, load_sources, samples_of
from pipeline.detector.split import split_of

FL27 = os.environ.get("BRANDMON_FL27_DIR")
pytestmark = pytest.mark.skipif(
    not FL27 or not Path(FL27, "annotations.txt").is_file(),
    reason="BRANDMON_FL27_DIR (FlickrLogos-27 folder with annotations.txt) is not set here",
)


def test_fl27_loads_as_boxes_and_splits_by_content_hash():
    sources = load_sources(FL27, "boxes")
    assert len(sources) == 809  # the photos of the training set, duplicate boxes collapsed
    classes = {b.cls for s in sources for b in s.boxes}
    assert len(classes) == 27 and {"Adidas", "Yahoo", "McDonalds"} <= classes
    assert all(s.boxes for s in sources)
    # a few photos are byte-identical copies under other names: one hash, so one split (no leak)
    assert len({s.sha256 for s in sources}) == 798
    splits = Counter(split_of(s.sha256) for s in sources)
    assert 0.6 < splits["train"] / 809 < 0.8 and splits["val"] > 80 and splits["test"] > 80
    # held-out photos yield a whole-photo positive (when one brand) and a region away from boxes
    test = [s for s in sources if split_of(s.sha256) == "test"][:20]
    samples = [x for s in test for x in samples_of(s, "test", SampleSpec())]
    assert {x.kind for x in samples} <= {"whole", "region"}
    assert any(x.label == NO_LOGO for x in samples) and any(x.label != NO_LOGO for x in samples)
