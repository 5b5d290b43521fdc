"""The agent's core: the federated protocol over its ports, secure aggregation, local training, privacy
and the aggregate checks (no gRPC, no HTTP framework, no database)."""
