"""The agent's adapters: gRPC clients of the aggregator and the gateway, and the local secret store."""
