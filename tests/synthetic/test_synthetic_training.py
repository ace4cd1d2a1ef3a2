"""Training folders: the `folders` layout, idempotent, on seeds the dataset never uses."""

from __future__ import annotations

import io

from PIL import Image

from pipeline.synthetic import build_dataset, image_seed, make_training_folders


def test_layout_and_idempotence(tmp_path):
    out = make_training_folders(tmp_path / "train", ["Acme", "Globex"], n_per_class=4, size=64)
    assert sorted(p.name for p in out.iterdir()) == ["Acme", "Globex", "no_logo"]
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 12
    assert Image.open(files[0]).size == (64, 64)
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    (out / "Acme" / "0001.jpg").write_bytes(b"corrupt")
    make_training_folders(tmp_path / "train", ["Acme", "Globex"], n_per_class=4, size=64)
    after = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(out.rglob("*.jpg"))}
    assert set(after) == set(before)
    for f, (mtime, data) in after.items():
        assert data == before[f][1]
        if f.name != "0001.jpg" or f.parent.name != "Acme":
            assert mtime == before[f][0], f  # untouched
    make_training_folders(tmp_path / "train", ["Acme", "Globex"], n_per_class=2, size=64)
    assert len(list(out.rglob("*.jpg"))) == 6
    Image.open(io.BytesIO((out / "no_logo" / "0000.jpg").read_bytes())).verify()


def test_training_seeds_disjoint_from_dataset():
    ds = build_dataset(days=3)
    train = {
        image_seed("training", s, b, n)
        for s in (1, 8, 1007)
        for b in ("Acme", "no_logo")
        for n in range(50)
    }
    assert not train & set(ds.image_seeds.values())
    assert all(s % 2 == 0 for s in ds.image_seeds.values()) and all(s % 2 == 1 for s in train)
