-- Signed round mask keys (docs/he-codec.md, "Signed round keys"): each agent's signature over its
-- X25519 public key for the round and its certificate (DER), relayed to every peer, which checks
-- them against the federation CA before deriving a mask. Empty for a federation without TLS.
ALTER TABLE mask_keys ADD COLUMN signature bytea NOT NULL DEFAULT ''::bytea;
ALTER TABLE mask_keys ADD COLUMN certificate bytea NOT NULL DEFAULT ''::bytea;
