-- FHIR Consent decisions about research use, kept with provenance like any record: re-sending
-- the same Consent is a no-op; the latest Consent (by its dateTime, else its arrival) decides. A patient
-- whose latest decision is "deny" is left out of every training export and federated statistic.
CREATE TABLE consents (
    id              bigserial PRIMARY KEY,
    patient_key     text NOT NULL,
    decision        text NOT NULL CHECK (decision IN ('permit', 'deny')),
    purpose         text NOT NULL DEFAULT 'research',
    decided_at      timestamptz,
    source_system   text NOT NULL,
    source_id       text NOT NULL,
    payload_sha256  text NOT NULL,
    recorded_by     text NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (source_system, source_id, payload_sha256)
);
CREATE INDEX consents_patient ON consents (patient_key);
