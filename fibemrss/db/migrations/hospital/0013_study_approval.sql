-- Studies a hospital reviewed (issue 14): its site policy (what may ever be approved) and every
-- decision its operators made, pinned by the study's hash. The agent joins, and the gateway
-- exports for, only a study whose latest decision for that hash is 'approved'.
CREATE TABLE site_policy (
    id        integer PRIMARY KEY CHECK (id = 1),
    document  text NOT NULL,
    set_by    text NOT NULL,
    set_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE study_decisions (
    id          bigserial PRIMARY KEY,
    study       text NOT NULL,
    study_hash  text NOT NULL,
    version     integer NOT NULL,
    decision    text NOT NULL CHECK (decision IN ('approved', 'refused')),
    reason      text NOT NULL DEFAULT '',
    eligible    integer,
    document    text NOT NULL,
    decided_by  text NOT NULL,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX study_decisions_by_study ON study_decisions (study, study_hash, id);
