"""Reusable test servers (HTTP sink, SMTP sink) on 127.0.0.1; imported as `support.*` since
pytest puts tests/ on sys.path for tests/conftest.py."""
