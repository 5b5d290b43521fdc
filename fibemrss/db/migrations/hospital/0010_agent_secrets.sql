-- Secrets that never leave the hospital: the agent derives its per-round pairwise-masking keys
-- from one of them (docs/he-codec.md), so a restarted agent recovers its keys.
CREATE TABLE agent_secrets (
    name        text PRIMARY KEY,
    secret      bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
