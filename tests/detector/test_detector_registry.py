"""Registry activation policy: a retrain replaces the active model only when it beats it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.detector.registry import active_version, maybe_activate, register


def _register(ctx, f1: float) -> str:
    spec = SimpleNamespace(classes=["no_logo", "Acme"], base="inception_v3", weights="none", input_size=75, threshold=0.5)
    return register(ctx, spec, f"artifact-{f1}".encode(), "fp", {"f1": f1}, {})


@pytest.mark.parametrize(("new_f1", "activated"), [(0.81, True), (0.80, False), (0.79, False)])
def test_if_better_activates_only_a_strictly_better_model(make_ctx, new_f1, activated):
    ctx = make_ctx()
    first = _register(ctx, 0.80)
    assert maybe_activate(ctx, first, "if_better")  # nothing active yet: the first one wins
    second = _register(ctx, new_f1)
    assert maybe_activate(ctx, second, "if_better") is activated
    assert active_version(ctx)["version"] == (second if activated else first)


def test_never_and_always(make_ctx):
    ctx = make_ctx()
    v1 = _register(ctx, 0.9)
    assert not maybe_activate(ctx, v1, "never") and active_version(ctx) is None
    assert maybe_activate(ctx, v1, "always")
    v2 = _register(ctx, 0.1)
    assert maybe_activate(ctx, v2, "always") and active_version(ctx)["version"] == v2
