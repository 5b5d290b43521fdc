-- Studies proposed to the federation by operator@central (issue 14): the document as sent and
-- the hash of its canonical form; a federation pins the hash it trains. Every proposal is in the
-- aggregator's audit log. No patient data: a study document names codes, never a patient.
CREATE TABLE study_proposals (
    study        text NOT NULL,
    study_hash   text NOT NULL,
    version      integer NOT NULL,
    document     bytea NOT NULL,
    proposed_by  text NOT NULL,
    proposed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (study, study_hash)
);

CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    subject  text NOT NULL DEFAULT ''
);

ALTER TABLE federations ADD COLUMN study_hash text NOT NULL DEFAULT '';
