-- Pairwise masking (docs/he-codec.md): per federation a random id the masks are bound to and a
-- minimum number of contributors; per round an attempt number and the cohort whose masks the
-- uploads carry; per round each hospital's X25519 PUBLIC key (never a private key).
ALTER TABLE federations ADD COLUMN pairwise_masking boolean NOT NULL DEFAULT false;
ALTER TABLE federations ADD COLUMN min_contributors integer NOT NULL DEFAULT 1;
ALTER TABLE federations ADD COLUMN federation_id bytea NOT NULL DEFAULT decode(md5(random()::text || clock_timestamp()::text), 'hex');

ALTER TABLE rounds ADD COLUMN attempt integer NOT NULL DEFAULT 1;
ALTER TABLE rounds ADD COLUMN cohort text[];

CREATE TABLE mask_keys (
    task          text NOT NULL,
    round         bigint NOT NULL,
    hospital      text NOT NULL,
    public_key    bytea NOT NULL,
    published_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (task, round, hospital),
    FOREIGN KEY (task, round) REFERENCES rounds(task, round)
);

-- Patient-level DP: the epsilon a hospital reports having spent after the round (a function of
-- the task spec, not of any data), shown in the federation status.
ALTER TABLE submissions ADD COLUMN epsilon double precision;
