-- Secure aggregation against a lying aggregator (docs/he-codec.md, "Secure aggregation"): each
-- round's stages after its cohort (shares, uploads, survivors, reveals), who posted in each when
-- it closed, and the members' messages, stored as sent (the aggregator cannot read the shares:
-- they are encrypted to their recipient). Uploads carry their sender's signature over the chunk
-- digests and are kept after the round closes, so any member can check the sum.
CREATE TABLE round_messages (
    task         text NOT NULL,
    round        bigint NOT NULL,
    stage        text NOT NULL,
    sender       text NOT NULL,
    recipient    text NOT NULL DEFAULT '',
    payload      bytea NOT NULL,
    signature    bytea NOT NULL DEFAULT ''::bytea,
    certificate  bytea NOT NULL DEFAULT ''::bytea,
    posted_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (task, round, stage, sender, recipient),
    FOREIGN KEY (task, round) REFERENCES rounds(task, round)
);

CREATE TABLE round_stages (
    task       text NOT NULL,
    round      bigint NOT NULL,
    stage      text NOT NULL,
    members    text[] NOT NULL,
    closed_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (task, round, stage),
    FOREIGN KEY (task, round) REFERENCES rounds(task, round)
);

ALTER TABLE rounds ADD COLUMN stage_opened_at timestamptz;
ALTER TABLE submissions ADD COLUMN signature bytea NOT NULL DEFAULT ''::bytea;
ALTER TABLE submissions ADD COLUMN certificate bytea NOT NULL DEFAULT ''::bytea;
ALTER TABLE submissions ADD COLUMN digests bytea NOT NULL DEFAULT ''::bytea;
