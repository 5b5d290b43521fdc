-- Secrets that never leave the hospital: the agent derives its per-round pairwise-masking keys
-- from one of them (docs/he-codec.md), so a restarted agent recovers its keys.
CREATE TABLE agent_secrets (
    name        text PRIMARY KEY,
    secret      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The hospital's privacy ledger: every spend of a dataset's privacy (a DP-SGD training round, the
-- noised dataset size of a federation), and the budget the hospital sets per dataset. Only this
-- hospital writes it; nothing central can override it.
CREATE TABLE privacy_budgets (
    dataset     text PRIMARY KEY,
    epsilon     double precision NOT NULL CHECK (epsilon >= 0),
    delta       double precision NOT NULL CHECK (delta >= 0 AND delta < 1),
    set_by      text NOT NULL,
    set_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE privacy_ledger (
    id              bigserial PRIMARY KEY,
    dataset         text NOT NULL,
    task            text NOT NULL,
    federation_id   bytea NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('dp-sgd', 'dataset-size')),
    round           bigint NOT NULL,
    -- Cumulative over this federation and kind: the federation's spend is its latest row.
    rounds          integer NOT NULL,
    epsilon         double precision NOT NULL,
    delta           double precision NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX privacy_ledger_dataset ON privacy_ledger (dataset, federation_id, kind, id);
