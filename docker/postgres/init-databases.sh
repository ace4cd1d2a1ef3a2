#!/bin/bash
# Runs once, when the postgres volume is first initialised: one role and one database for
# the Airflow metadata, one for the brandmon pipeline data (kept apart so that
# `airflow db migrate` and brandmon's Alembic history never meet).
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v airflow_pw="$AIRFLOW_DB_PASSWORD" -v brandmon_pw="$BRANDMON_DB_PASSWORD" <<'SQL'
CREATE ROLE airflow LOGIN PASSWORD :'airflow_pw';
CREATE DATABASE airflow OWNER airflow;
CREATE ROLE brandmon LOGIN PASSWORD :'brandmon_pw';
CREATE DATABASE brandmon OWNER brandmon;
SQL
