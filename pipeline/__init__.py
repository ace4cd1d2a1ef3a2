"""brandmon: brand-monitoring data pipeline (ingest, detect, aggregate)."""

from __future__ import annotations

__version__ = "0.1.0"
