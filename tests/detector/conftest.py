"""Detector fixtures: one tiny trained model per session, installable into any Context."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from detector_helpers import FAST, make_folders

from pipeline.context import Context
from pipeline.database import upgrade
from pipeline.settings import load_settings


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Artifact bytes + registry fields of a model trained once on generated marks."""
    from pipeline.detector.jobs import train_model

    root = tmp_path_factory.mktemp("tiny_model")
    env = {
        "BRANDMON_HOME": str(root / "var"),
        "BRANDMON_DATABASE_URL": f"sqlite:///{root / 'b.db'}",
        "BRANDMON_STORAGE_URL": (root / "lake").as_uri(),
        "BRANDMON_AUTHOR_SALT": "s",
    }
    ctx = Context(load_settings(env=env))
    upgrade(ctx.engine)
    data = make_folders(root / "data", {"Reddisc": 24, "Bluesquare": 24, "no_logo": 24}, seed=5)
    result = train_model(ctx, data, weights="none", target_precision=0.8, **FAST)
    from pipeline.detector.registry import get_version

    row = get_version(ctx, result["version"])
    artifact = ctx.store.get(row["artifact_key"])
    ctx.close()
    return {"artifact": artifact, "row": row, "metrics": result["metrics"]}


@pytest.fixture
def install_model(tiny_model: dict[str, Any]) -> Callable[[Context], str]:
    """Register the session's tiny model in a Context and activate it; returns its version."""

    def install(ctx: Context, threshold: float | None = None) -> str:
        from pipeline.detector import registry
        from pipeline.detector.model import read_spec

        spec = read_spec(tiny_model["artifact"])
        if threshold is not None:
            spec.threshold = threshold
        row = tiny_model["row"]
        version = registry.register(ctx, spec, tiny_model["artifact"], row["data_fingerprint"], row["metrics"], row["params"])
        registry.activate(ctx, version)
        return version

    return install


@pytest.fixture(autouse=True)
def _quiet_tf() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


