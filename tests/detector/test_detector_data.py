from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from detector_helpers import jpeg_bytes, make_boxes, make_folders
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.detector import NO_LOGO
from pipeline.detector.data import (
    Box,
    DataError,
    SampleSpec,
    SourceImage,
    UnfitBoxes,
    canonical_class,
    clip_box,
    fingerprint,
    free_regions,
    load_boxes,
    load_folders,
    parse_fl27_annotations,
    parse_json_boxes,
    samples_of,
    with_margin,
)
from pipeline.detector.training.prepare import class_weight_map, upsample_indices


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def test_fl27_lines_parse_and_duplicate_boxes_collapse():
    text = (
        "144503924.jpg Adidas 1 38 12 234 142 \n"
        "144503924.jpg Adidas 2 38 12 234 142\n"  # the same box in another subset
        "4763210295.jpg Adidas 1 83 63 130 93\n"
        "4763210295.jpg Adidas 1 91 288 125 306\n"
    )
    boxes = parse_fl27_annotations(text)
    assert boxes["144503924.jpg"] == [Box("Adidas", 38, 12, 234, 142)]
    assert len(boxes["4763210295.jpg"]) == 2
    with pytest.raises(DataError, match="line 1"):
        parse_fl27_annotations("not an annotation line\n")


def test_json_boxes_use_classtxt_and_accept_one_object():
    doc = [{"xmin": 289, "ymin": 387, "xmax": 543, "ymax": 702, "classtxt": "pink bag", "class": 4}]
    assert parse_json_boxes(doc, "x.json") == [Box("pink bag", 289, 387, 543, 702)]
    assert parse_json_boxes(doc[0], "x.json") == [Box("pink bag", 289, 387, 543, 702)]
    with pytest.raises(DataError, match="numeric"):
        parse_json_boxes([{"xmin": "a", "classtxt": "x"}], "bad.json")


def test_no_logo_folder_names_are_case_insensitive():
    assert canonical_class("No_Logo") == NO_LOGO
    assert canonical_class("NO-LOGO") == NO_LOGO
    assert canonical_class("Acme") == "Acme"


def test_folders_loader(tmp_path: Path):
    make_folders(tmp_path, {"Reddisc": 3, "NO_LOGO": 2})
    (tmp_path / "Reddisc" / "notes.txt").write_text("ignored")
    srcs = load_folders(tmp_path)
    assert sorted(s.label for s in srcs) == ["Reddisc"] * 3 + [NO_LOGO] * 2
    assert len({s.sha256 for s in srcs}) == 5
    with pytest.raises(DataError):
        load_folders(tmp_path / "missing")


@pytest.mark.parametrize("style", ["json", "fl27"])
def test_boxes_loader_and_samples(tmp_path: Path, style: str):
    make_boxes(tmp_path, 6, style=style)
    srcs = load_boxes(tmp_path)
    assert len(srcs) == 6
    assert all(len(s.boxes) == 1 for s in srcs)  # FL27 duplicates collapsed
    spec = SampleSpec(negatives_train=2, negatives_eval=1, min_region=32)
    for src in srcs:
        train = samples_of(src, "train", spec, size=(160, 160))
        kinds = [s.kind for s in train]
        assert kinds.count("logo") == 1 and kinds.count("whole") == 1
        box = src.boxes[0].region
        for s in train:
            if s.kind == "region":
                assert s.label == NO_LOGO
                assert not _overlap(s.region, box)
            if s.kind == "logo":
                assert s.label == src.boxes[0].cls
                assert s.region[0] <= box[0] and s.region[2] >= box[2]  # context margin around the box
        evals = samples_of(src, "test", spec, size=(160, 160))
        assert [s.kind for s in evals][0] == "whole" and all(s.kind != "logo" for s in evals)


def test_boxes_loader_needs_annotations(tmp_path: Path):
    make_folders(tmp_path, {"Reddisc": 1})
    with pytest.raises(DataError, match="no box annotations"):
        load_boxes(tmp_path)


def test_free_regions_avoid_every_box():
    rng = random.Random(3)
    boxes = [(50, 50, 150, 120), (300, 200, 380, 300)]
    regions = free_regions(500, 375, boxes, 5, rng, min_side=48)
    assert regions
    for r in regions:
        assert r[2] - r[0] >= 48 and r[3] - r[1] >= 48
        assert not any(_overlap(r, with_margin(b, 500, 375, 0.1)) for b in boxes)
    # An image filled by its box has no free region.
    assert free_regions(100, 100, [(0, 0, 100, 100)], 3, rng) == []


def test_sample_keys_and_fingerprint_are_stable():
    src = SourceImage("a" * 64, None, boxes=(Box("X", 1, 1, 50, 50),), origin="boxes")
    s1 = samples_of(src, "train", SampleSpec(), size=(200, 200))
    s2 = samples_of(src, "train", SampleSpec(), size=(200, 200))
    assert [s.key for s in s1] == [s.key for s in s2]
    assert fingerprint(s1) == fingerprint(list(reversed(s2)))
    assert len({s.key for s in s1}) == len(s1)


def test_upsampling_balances_rare_classes_and_keeps_every_sample():
    labels = ["a"] * 40 + ["b"] * 6 + ["no_logo"] * 30
    order = upsample_indices(labels, 1.0, random.Random(0))
    counts = {c: sum(1 for i in order if labels[i] == c) for c in set(labels)}
    assert counts == {"a": 40, "b": 40, "no_logo": 40}
    assert set(order) == set(range(len(labels)))  # nothing dropped
    b_idx = [i for i in order if labels[i] == "b"]
    assert max(b_idx.count(i) for i in set(b_idx)) - min(b_idx.count(i) for i in set(b_idx)) <= 1
    half = upsample_indices(labels, 0.5, random.Random(0))
    assert sum(1 for i in half if labels[i] == "b") == 20
    assert upsample_indices(labels, 0, random.Random(0)) == list(range(len(labels)))


def test_class_weights_are_inverse_frequency():
    w = class_weight_map(["a"] * 30 + ["b"] * 10, ["no_logo", "a", "b"])
    assert w[2] == pytest.approx(3 * w[1])
    assert w[0] == 1.0


def test_json_sidecar_errors_name_the_file(tmp_path: Path):
    make_boxes(tmp_path, 1)
    (tmp_path / "img0000.json").write_text("{broken")
    with pytest.raises(DataError, match="img0000.json"):
        load_boxes(tmp_path)
    (tmp_path / "img0000.json").write_text(json.dumps([{"xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9, "classtxt": "Reddisc"}]))
    assert load_boxes(tmp_path)[0].boxes[0].cls == "Reddisc"


def test_boxes_that_do_not_fit_their_photo_are_said_once_per_data_set(tmp_path: Path, caplog):
    """Outside check (#14): boxes outside the photo, of zero area or negative were clipped or
    dropped without a word; loading says it once, with the counts and an example, and keeps
    the boxes as given (training clips and drops them as before)."""
    import logging

    make_boxes(tmp_path, 6, style="fl27")  # 160 px photos, one good box each
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.data"):
        good = load_boxes(tmp_path)
    assert not [r for r in caplog.records if "do not fit" in r.getMessage()]
    odd = ["img0000.jpg Reddisc 1 150 150 400 400",  # reaches outside: clipped to 150..160
           "img0001.jpg Reddisc 1 500 500 600 600",  # outside the photo: dropped
           "img0002.jpg Reddisc 1 30 30 30 80",  # zero area: dropped
           "img0003.jpg Reddisc 1 -20 -20 50 50"]  # negative corner: clipped
    with (tmp_path / "annotations.txt").open("a") as fh:
        fh.write("\n".join(odd) + "\n")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.data"):
        srcs = load_boxes(tmp_path)
    said = [r.getMessage() for r in caplog.records if "do not fit" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"4 of 10 boxes under {tmp_path} do not fit their photo: 2 clipped to it")
    assert "2 dropped (outside it, of zero or negative size" in said[0]
    assert "e.g. img0000.jpg Reddisc (150, 150, 400, 400) on a 160x160 photo clipped to (150, 150, 160, 160)" in said[0]
    # otherwise the same: the boxes as written, and the samples training cuts from them
    by_name = {s.name: s for s in srcs}
    assert Box("Reddisc", -20, -20, 50, 50) in by_name["img0003.jpg"].boxes
    spec = SampleSpec()
    for before in good:
        after = by_name[before.name]
        assert after.sha256 == before.sha256 and after.boxes[: len(before.boxes)] == before.boxes
    assert [s.region for s in samples_of(by_name["img0001.jpg"], "train", spec, size=(160, 160))] == [
        s.region for s in samples_of(next(g for g in good if g.name == "img0001.jpg"), "train", spec, size=(160, 160))]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(*[st.integers(-300, 300)] * 4), max_size=8), st.integers(1, 64), st.integers(1, 64))
def test_unfit_boxes_counts_exactly_what_training_clips_or_drops(coords, width, height):
    from PIL import Image

    data = jpeg_bytes(Image.new("RGB", (width, height)))
    boxes = [Box("A", *c) for c in coords]
    unfit = UnfitBoxes()
    unfit.check("x.jpg", data, boxes)
    assert unfit.total == len(boxes)
    assert unfit.dropped == sum(clip_box(b, width, height) is None for b in boxes)
    assert unfit.clipped == sum(clip_box(b, width, height) not in (None, b) for b in boxes)
    assert bool(unfit.example) == bool(unfit.clipped or unfit.dropped)
