-- Source identifiers are kept only as keyed hashes (docs/gateway.md, "Identifiers at rest"): the
-- gateway stores HMAC-SHA256 hashes of source ids (records, FHIR resources, HL7 control ids and
-- visit numbers, CSV row ids, Consents) under a key derived from its pseudonym key, which this
-- database never sees. So this migration cannot hash: it marks every row written before it
-- (raw_source_ids = true) and the gateway rehashes the marked rows at start-up, clearing each
-- mark in the transaction that hashes the row (and, for a source record, its observations,
-- conditions and encounters). Rows written from now on take the default, false.
ALTER TABLE source_records ADD COLUMN raw_source_ids boolean NOT NULL DEFAULT true;
ALTER TABLE source_records ALTER COLUMN raw_source_ids SET DEFAULT false;
ALTER TABLE quarantine ADD COLUMN raw_source_ids boolean NOT NULL DEFAULT true;
ALTER TABLE quarantine ALTER COLUMN raw_source_ids SET DEFAULT false;
ALTER TABLE consents ADD COLUMN raw_source_ids boolean NOT NULL DEFAULT true;
ALTER TABLE consents ALTER COLUMN raw_source_ids SET DEFAULT false;
CREATE INDEX source_records_raw_ids ON source_records (id) WHERE raw_source_ids;
CREATE INDEX quarantine_raw_ids ON quarantine (id) WHERE raw_source_ids;
CREATE INDEX consents_raw_ids ON consents (id) WHERE raw_source_ids;
