"""The gateway's core: use cases and pure rules (no gRPC, no HTTP framework, no database)."""
