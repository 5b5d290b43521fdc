-- A model version can be retired: it is no longer served, newest or pinned. Retiring the newest
-- one rolls inference back to the previous version. The row (and its audit trail) stays.
ALTER TABLE model_versions ADD COLUMN retired_at timestamptz;
ALTER TABLE model_versions ADD COLUMN retired_by text;
ALTER TABLE model_versions ADD COLUMN retire_reason text;
