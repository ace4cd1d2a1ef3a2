"""Detector fixtures: one tiny trained model per session, installable into any Context."""

from __future__ import annotations

import fcntl
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from detector_helpers import FAST, make_folders

from pipeline.context import Context
from pipeline.database import upgrade
from pipeline.settings import load_settings


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Artifact bytes + registry fields of a model trained once on generated marks: once per
    test session, even on several pytest-xdist workers (the first trains it, under a file
    lock in the session's shared temporary directory; the others read what it wrote)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return _train_tiny_model(tmp_path_factory.mktemp("tiny_model"))
    shared = tmp_path_factory.getbasetemp().parent  # pytest-N/, above each worker's popen-gwK/
    saved = shared / "tiny_model.pickle"
    with open(shared / "tiny_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not saved.exists():
            model = _train_tiny_model(tmp_path_factory.mktemp("tiny_model"))
            saved.with_suffix(".tmp").write_bytes(pickle.dumps(model))
            saved.with_suffix(".tmp").replace(saved)
    return pickle.loads(saved.read_bytes())  # written above, by this test session


def _train_tiny_model(root: Path) -> dict[str, Any]:
    from pipeline.detector.jobs import train_model

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


