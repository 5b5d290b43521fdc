"""The aggregator's core: the round logic (the coordinator over its store and clock ports), the pure
round and cohort rules, running sums, ciphertext checks and study proposals (no gRPC, no database)."""
