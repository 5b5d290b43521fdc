-- The aggregator's store. It holds ciphertexts and round bookkeeping only: no patient data,
-- no plaintext parameters, no dataset sizes (those travel inside the ciphertexts).

CREATE TABLE federations (
    task              text PRIMARY KEY,
    rounds            integer NOT NULL,
    quorum            integer NOT NULL,
    grace_seconds     double precision NOT NULL,
    deadline_seconds  double precision NOT NULL,
    hospitals         text[] NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rounds (
    task          text NOT NULL REFERENCES federations(task),
    round         bigint NOT NULL,
    state         text NOT NULL,
    opened_at     timestamptz NOT NULL DEFAULT now(),
    deadline_at   timestamptz NOT NULL,
    quorum_at     timestamptz,
    closed_at     timestamptz,
    failure       text,
    PRIMARY KEY (task, round)
);

-- A submission is accepted only once all its chunks are stored, in the same transaction.
CREATE TABLE submissions (
    task          text NOT NULL,
    round         bigint NOT NULL,
    hospital      text NOT NULL,
    total_chunks  integer NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, round, hospital),
    FOREIGN KEY (task, round) REFERENCES rounds(task, round)
);

CREATE TABLE submission_chunks (
    task        text NOT NULL,
    round       bigint NOT NULL,
    hospital    text NOT NULL,
    idx         integer NOT NULL,
    ciphertext  bytea NOT NULL,
    PRIMARY KEY (task, round, hospital, idx),
    FOREIGN KEY (task, round, hospital) REFERENCES submissions(task, round, hospital)
);

CREATE TABLE aggregates (
    task          text NOT NULL,
    round         bigint NOT NULL,
    idx           integer NOT NULL,
    total_chunks  integer NOT NULL,
    contributors  integer NOT NULL,
    ciphertext    bytea NOT NULL,
    PRIMARY KEY (task, round, idx),
    FOREIGN KEY (task, round) REFERENCES rounds(task, round)
);
