-- A read-only Postgres role for BI tools: it can read the brandmon views
-- (v_daily_trend, v_share_of_voice, v_spikes, v_forecast) and nothing else: no base table, no writes,
-- no DDL in the brandmon schema. Views run with their owner's rights, so the role needs no
-- grant on mention_daily itself.
--
-- Run as the owner of the brandmon tables (or a superuser), after `brandmon db upgrade`:
--
--   BRANDMON_BI_PASSWORD='...' psql "postgresql://owner@host/brandmon" \
--        -v role=bi_reader -f sql/readonly_role.sql
--
-- or pass the password as `-v password=...` (it then shows in the process list and shell
-- history; prefer the environment variable). Safe to re-run: it creates the role if missing,
-- resets its password and attributes, and re-applies the grants.
--
-- Postgres 14 and older let every role (PUBLIC) create objects in schema `public`; since
-- Postgres 15 they cannot. On older servers also run, once, as the schema owner:
--   REVOKE CREATE ON SCHEMA public FROM PUBLIC;

\set ON_ERROR_STOP on

\if :{?role}
\else
\echo 'readonly_role.sql: give the role name: psql ... -v role=bi_reader -f sql/readonly_role.sql'
SELECT missing_role_variable;  -- fails on purpose: stops the script
\endif

\if :{?password}
\else
\getenv password BRANDMON_BI_PASSWORD
\endif
\if :{?password}
\else
\echo 'readonly_role.sql: set BRANDMON_BI_PASSWORD (or pass -v password=...)'
SELECT missing_password_variable;  -- fails on purpose: stops the script
\endif

BEGIN;

SELECT format('CREATE ROLE %I', :'role')
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec

ALTER ROLE :"role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'password';
-- Every transaction of the role is read-only unless it explicitly asks otherwise; the grants
-- below are what really forbid writes.
ALTER ROLE :"role" SET default_transaction_read_only = on;
ALTER ROLE :"role" SET statement_timeout = '120s';

SELECT format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), :'role') \gexec
GRANT USAGE ON SCHEMA public TO :"role";
REVOKE CREATE ON SCHEMA public FROM :"role";
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM :"role";
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM :"role";
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM :"role";
GRANT SELECT ON v_daily_trend, v_share_of_voice, v_spikes, v_forecast TO :"role";

COMMIT;

-- What the role can read now (expect exactly the three views).
SELECT table_name AS readable
FROM information_schema.role_table_grants
WHERE grantee = :'role' AND privilege_type = 'SELECT'
ORDER BY table_name;
