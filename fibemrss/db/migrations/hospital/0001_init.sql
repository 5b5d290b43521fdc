-- The hospital's own store: normalized records (gateway), model versions (agent, inference),
-- quarantine and the audit log. Raw identifiers are never stored: patient_key is a keyed hash.

CREATE TABLE patients (
    patient_key   text PRIMARY KEY,
    sex           text,
    birth_date    date,
    age_years     double precision,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- One row per version of a source record. Re-sending identical content hits the unique key
-- (a no-op); changed content under the same source id becomes a new version, the old one is
-- kept with superseded_at set.
CREATE TABLE source_records (
    id              bigserial PRIMARY KEY,
    source_system   text NOT NULL,
    source_id       text NOT NULL,
    payload_sha256  text NOT NULL,
    patient_key     text NOT NULL REFERENCES patients(patient_key),
    version         integer NOT NULL,
    ingested_at     timestamptz NOT NULL DEFAULT now(),
    superseded_at   timestamptz,
    UNIQUE (source_system, source_id, payload_sha256),
    UNIQUE (source_system, source_id, version)
);
CREATE INDEX source_records_current ON source_records (patient_key) WHERE superseded_at IS NULL;

CREATE TABLE observations (
    id             bigserial PRIMARY KEY,
    record_id      bigint NOT NULL REFERENCES source_records(id),
    patient_key    text NOT NULL,
    code_system    text NOT NULL,
    code           text NOT NULL,
    display        text NOT NULL DEFAULT '',
    value          double precision,
    unit           text,
    value_system   text,
    value_code     text,
    effective      timestamptz,
    source_id      text NOT NULL DEFAULT ''
);
CREATE INDEX observations_record ON observations (record_id);

CREATE TABLE conditions (
    id               bigserial PRIMARY KEY,
    record_id        bigint NOT NULL REFERENCES source_records(id),
    patient_key      text NOT NULL,
    code_system      text NOT NULL,
    code             text NOT NULL,
    display          text NOT NULL DEFAULT '',
    onset            timestamptz,
    clinical_status  text NOT NULL DEFAULT '',
    source_id        text NOT NULL DEFAULT ''
);
CREATE INDEX conditions_record ON conditions (record_id);

CREATE TABLE encounters (
    id           bigserial PRIMARY KEY,
    record_id    bigint NOT NULL REFERENCES source_records(id),
    patient_key  text NOT NULL,
    source_id    text NOT NULL,
    class_code   text NOT NULL DEFAULT '',
    start_at     timestamptz,
    end_at       timestamptz
);
CREATE INDEX encounters_record ON encounters (record_id);

CREATE TABLE quarantine (
    id              bigserial PRIMARY KEY,
    source_system   text NOT NULL,
    source_id       text NOT NULL,
    payload_sha256  text NOT NULL,
    record_json     jsonb NOT NULL,
    reasons         text[] NOT NULL,
    status          text NOT NULL DEFAULT 'open',
    created_at      timestamptz NOT NULL DEFAULT now(),
    resolved_at     timestamptz,
    resolved_by     text,
    resolution      text,
    UNIQUE (source_system, source_id, payload_sha256)
);

CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    purpose   text NOT NULL DEFAULT '',
    subject   text NOT NULL DEFAULT ''
);

CREATE TABLE model_versions (
    task             text NOT NULL,
    version          bigint NOT NULL,
    federated_round  bigint NOT NULL,
    model_json       jsonb NOT NULL,
    metrics          jsonb NOT NULL DEFAULT '{}'::jsonb,
    published_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, version)
);
