"""Ingestion: feed connectors -> raw lake -> normalised posts -> bulk upsert -> images.

Entry points: `pipeline.ingest.jobs` (`ingest_window`, `backfill`, `fetch_images`), called
by the CLI (`pipeline.ingest.cli`), the Airflow DAGs and the demo.
"""
