"""Deterministic synthetic social data: the demo's feed and the test suites' fixtures."""

from __future__ import annotations

from pipeline.synthetic.catalogue import DEMO_BRANDS, DEMO_SOURCE, brand_names, demo_config
from pipeline.synthetic.generate import (
    CATEGORIES,
    SyntheticDataset,
    build_dataset,
    generate_dataset,
    image_seed,
)
from pipeline.synthetic.marks import MARKS, MarkSpec, mark_spec, render_scene, scene_jpeg
from pipeline.synthetic.training import NO_LOGO, make_training_folders

__all__ = [
    "CATEGORIES",
    "DEMO_BRANDS",
    "DEMO_SOURCE",
    "MARKS",
    "NO_LOGO",
    "MarkSpec",
    "SyntheticDataset",
    "brand_names",
    "build_dataset",
    "demo_config",
    "generate_dataset",
    "image_seed",
    "make_training_folders",
    "mark_spec",
    "render_scene",
    "scene_jpeg",
]
