-- Inference serving every study the hospital approved (FIBEMRSS_STUDIES=approved, issue 25) reads
-- the hospital's study decisions to know which studies it serves; it may read them, never write.
GRANT SELECT ON study_decisions TO fibemrss_inference;
