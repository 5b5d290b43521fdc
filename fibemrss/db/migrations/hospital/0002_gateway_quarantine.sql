-- Quarantine review: the pseudonymous patient key of each held record (the raw source
-- identifier is never stored, not even inside record_json), and who resolved it and why.
ALTER TABLE quarantine ADD COLUMN patient_key text NOT NULL DEFAULT '';
ALTER TABLE quarantine ADD COLUMN resolution_reason text;
-- The accepted version a resolution wrote, when it was accepted.
ALTER TABLE quarantine ADD COLUMN resolved_record_id bigint REFERENCES source_records(id);
CREATE INDEX quarantine_status ON quarantine (status, id);
-- Reads of the current version of a source record (idempotency and versioning on ingest).
CREATE INDEX source_records_current_source ON source_records (source_system, source_id)
    WHERE superseded_at IS NULL;
