-- Personalized local models (docs/federation.md): after the last round a hospital fine-tunes the
-- global model on its own rows and publishes it as another version. `kind` says which it is,
-- `base_version` the global version it was fine-tuned from. A `standby` version is published and
-- can be pinned, but is not served by default: the personalized model that lost the validation
-- choice to the global one.
ALTER TABLE model_versions ADD COLUMN kind text NOT NULL DEFAULT 'global'
    CHECK (kind IN ('global', 'personalized'));
ALTER TABLE model_versions ADD COLUMN base_version bigint;
ALTER TABLE model_versions ADD COLUMN standby boolean NOT NULL DEFAULT false;
