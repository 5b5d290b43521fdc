-- One PostgreSQL role per service, with least privilege (docs/security.md, "Database roles").
-- The migrations run as the database's owner; the services connect as LOGIN roles that are
-- members of these NOLOGIN group roles (fibemrss/db/roles.py makes them for `fibemrss up`, the
-- demo and the chart; a DBA may make them by hand: docs/runbook.md, "Database roles"). Each grant
-- below is what one service's adapters execute, no more: tests/hostile/test_db_roles.py runs
-- every adapter under its role and attacks each role with what it may not do. A table added by a
-- later migration is reachable by no service until that migration grants it (the same test fails
-- until the new table has its line in the role matrix).
--
-- Roles are objects of the whole server, not of one database: several hospital databases on one
-- server share the group roles, and CONNECT (granted per login, per database) keeps each login in
-- its own database. Creating a missing role needs CREATEROLE; a DBA who made them already lets
-- the owner migrate without it.
DO $$
DECLARE
    r text;
BEGIN
    FOREACH r IN ARRAY ARRAY['fibemrss_gateway', 'fibemrss_agent', 'fibemrss_inference'] LOOP
        IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
            BEGIN
                EXECUTE format('CREATE ROLE %I NOLOGIN', r);
            EXCEPTION WHEN duplicate_object OR unique_violation THEN
                NULL;  -- another database of this server made it at the same moment
            END;
        END IF;
    END LOOP;
    -- Nothing for PUBLIC (any login of the server): no new tables, no reads.
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', current_schema());
    EXECUTE format(
        'GRANT USAGE ON SCHEMA %I TO fibemrss_gateway, fibemrss_agent, fibemrss_inference', current_schema()
    );
END
$$;

-- Every service checks at start that no migration is pending (fibemrss/db/migrate.py).
GRANT SELECT ON schema_migrations TO fibemrss_gateway, fibemrss_agent, fibemrss_inference;

-- The gateway: records, quarantine, consents, study review. Updates only where its store updates
-- (a new version supersedes the old; the start-up rehash of source identifiers, migration 0025).
GRANT SELECT, INSERT, UPDATE ON patients TO fibemrss_gateway;
GRANT SELECT, INSERT ON source_records TO fibemrss_gateway;
GRANT UPDATE (superseded_at, source_id, raw_source_ids) ON source_records TO fibemrss_gateway;
GRANT SELECT, INSERT ON observations, conditions, encounters TO fibemrss_gateway;
GRANT UPDATE (source_id) ON observations, conditions, encounters TO fibemrss_gateway;
GRANT SELECT, INSERT, UPDATE ON quarantine TO fibemrss_gateway;
GRANT SELECT, INSERT ON consents TO fibemrss_gateway;
GRANT UPDATE (source_id, raw_source_ids) ON consents TO fibemrss_gateway;
GRANT SELECT, INSERT, UPDATE ON site_policy TO fibemrss_gateway;
GRANT SELECT, INSERT ON study_decisions TO fibemrss_gateway;
-- The hospital's operators act through the gateway (DESIGN's roles: operator@h retires models and
-- sets privacy budgets, `ModelStore.retire`, `PrivacyLedger.set_budget`; the auditor reads the
-- audit log): so it reads the audit log, the models and the ledger, and may retire a version
-- (the three retire columns), never change or publish one.
GRANT SELECT, INSERT ON audit_log TO fibemrss_gateway;
GRANT SELECT ON model_versions, privacy_ledger TO fibemrss_gateway;
GRANT UPDATE (retired_at, retired_by, retire_reason) ON model_versions TO fibemrss_gateway;
GRANT SELECT, INSERT, UPDATE ON privacy_budgets TO fibemrss_gateway;
GRANT USAGE ON SEQUENCE source_records_id_seq, observations_id_seq, conditions_id_seq, encounters_id_seq,
    quarantine_id_seq, consents_id_seq, study_decisions_id_seq, audit_log_id_seq TO fibemrss_gateway;

-- The agent: publishes model versions, spends privacy, keeps its secrets; reads (never makes) the
-- hospital's study decisions and budgets. No patient table: it streams examples from the gateway.
GRANT SELECT, INSERT ON model_versions TO fibemrss_agent;
GRANT SELECT ON site_policy, study_decisions, privacy_budgets TO fibemrss_agent;
GRANT SELECT, INSERT ON privacy_ledger TO fibemrss_agent;
GRANT INSERT ON audit_log TO fibemrss_agent;
-- Its secrets are sealed at rest (AES-256-GCM, services/hospital_agent/adapters/local_secrets.py);
-- key_id names the key a row is sealed under, NULL for a row written in clear before this
-- migration, which the agent seals at its next start (the only UPDATE it may make).
ALTER TABLE agent_secrets ADD COLUMN key_id text;
GRANT SELECT, INSERT ON agent_secrets TO fibemrss_agent;
GRANT UPDATE (secret, key_id) ON agent_secrets TO fibemrss_agent;
GRANT USAGE ON SEQUENCE privacy_ledger_id_seq, audit_log_id_seq TO fibemrss_agent;

-- Inference: reads the published models, nothing else.
GRANT SELECT ON model_versions TO fibemrss_inference;

-- The audit log and the privacy ledger are append-only for everyone: no service role holds
-- UPDATE, DELETE or TRUNCATE on them (above), and this trigger refuses those to the owner and the
-- migrations too, so a rewrite of history is a visible act (a migration that disables the
-- trigger), never a slip. A superuser can still drop the trigger: the guard is against the
-- services and mistakes, not against the server's administrator.
CREATE FUNCTION fibemrss_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fibemrss_append_only();
CREATE TRIGGER privacy_ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON privacy_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION fibemrss_append_only();
