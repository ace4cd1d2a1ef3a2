"""Alerts: rules over `mention_daily` (spike, share of voice, week-over-week) sent once per
rule, day and key to webhooks, Slack and email, with a ledger (`alert_ledger`) that makes
re-runs, backfills and concurrent runs send nothing twice.

Modules: `config` (the YAML `alerts:` section), `rules` (what fired), `message` (the texts),
`transport` (bounded HTTP/SMTP sends, Airflow hooks), `ledger` (claim -> send -> mark),
`jobs` (what the aggregate step and the CLI call), `cli`.
"""
