"""The gateway's edges: one thin adapter per transport (gRPC, FHIR REST with bulk NDJSON, MLLP)."""
