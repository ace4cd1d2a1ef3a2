"""The logo detector: Inception v3 classifier + local-feature matcher, registry, batched inference.

Modules that need TensorFlow import it inside functions, so importing `pipeline.detector.cli`
or `pipeline.detector.jobs` (the CLI, Airflow DAG parsing) stays fast.
"""

from __future__ import annotations

NO_LOGO = "no_logo"
