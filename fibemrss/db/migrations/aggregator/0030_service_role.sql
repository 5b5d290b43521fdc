-- The aggregator's own PostgreSQL role (docs/security.md, "Database roles"): the migrations run
-- as the database's owner, the aggregator connects as a LOGIN member of fibemrss_aggregator,
-- which may read and write the round tables but change no schema, and may only add to its audit
-- log. Its tables hold ciphertexts and bookkeeping only, and one service uses them, so tables
-- added by later migrations get the same read/write grants by default (made by the owner that
-- runs the migrations); the audit log is the one exception, narrowed below.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'fibemrss_aggregator') THEN
        BEGIN
            CREATE ROLE fibemrss_aggregator NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- another database of this server made it at the same moment
        END;
    END IF;
    EXECUTE format('REVOKE CREATE ON SCHEMA %I FROM PUBLIC', current_schema());
    EXECUTE format('REVOKE ALL ON ALL TABLES IN SCHEMA %I FROM PUBLIC', current_schema());
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO fibemrss_aggregator', current_schema());
    EXECUTE format(
        'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA %I TO fibemrss_aggregator',
        current_schema()
    );
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA %I TO fibemrss_aggregator', current_schema());
    EXECUTE format(
        'ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO fibemrss_aggregator',
        current_schema()
    );
    EXECUTE format(
        'ALTER DEFAULT PRIVILEGES IN SCHEMA %I GRANT USAGE ON SEQUENCES TO fibemrss_aggregator',
        current_schema()
    );
END
$$;
-- Reads which migrations ran (its start-up check), never records one.
REVOKE INSERT, UPDATE, DELETE ON schema_migrations FROM fibemrss_aggregator;
REVOKE SELECT, UPDATE, DELETE ON audit_log FROM fibemrss_aggregator;

-- Append-only for everyone, the owner included (as the hospital's audit log, migration 0030 of
-- the hospital schema): a rewrite of history is a migration that disables this trigger.
CREATE FUNCTION fibemrss_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION fibemrss_append_only();
