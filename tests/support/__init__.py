"""Test tools, not shipped in the wheel: throwaway services (`services`: Postgres cluster, moto
S3 server, S3 fault proxy), fake feed APIs and hostile HTTP servers (`feeds`), alert sinks
(`servers`, `alert_data`). Imported as `tests.support.*`: pytest puts the repository root on
sys.path (`pythonpath` in pyproject.toml), bench/ scripts insert it themselves."""
