"""A `folders` training set of synthetic scenes for the demo logo model.

Its render seeds are odd and the dataset's are even (`image_seed`), so a model trained here
is always evaluated on scenes it has never seen.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from pipeline.detector import NO_LOGO  # the one spelling of the no-brand class
from pipeline.synthetic.catalogue import brand_names
from pipeline.synthetic.generate import image_seed
from pipeline.synthetic.marks import scene_jpeg

_NAME = re.compile(r"^\d{4}\.jpg$")


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Atomically write `data` unless the file already holds exactly it; True if written."""
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".jpg")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True


def make_training_folders(
    out_dir: Path | str,
    brands: list[str] | None = None,
    n_per_class: int = 60,
    size: int = 160,
    seed: int = 1,
) -> Path:
    """Write `out_dir/<Brand>/<nnnn>.jpg` and `out_dir/no_logo/<nnnn>.jpg`; return out_dir.

    Idempotent: files already holding the right bytes are left alone, numbered files beyond
    `n_per_class` (from an earlier, larger run) are removed so the layout matches the call.
    """
    out = Path(out_dir)
    classes: list[tuple[str, str | None]] = [
        (b, b) for b in (brand_names() if brands is None else brands)
    ]
    classes.append((NO_LOGO, None))
    for folder, brand in classes:
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        wanted = set()
        for n in range(n_per_class):
            name = f"{n:04d}.jpg"
            wanted.add(name)
            data = scene_jpeg(image_seed("training", seed, folder, n), brand, size=size)
            _write_if_changed(d / name, data)
        for stale in d.iterdir():
            if _NAME.match(stale.name) and stale.name not in wanted:
                stale.unlink()
    return out
