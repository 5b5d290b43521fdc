"""Inference's adapters: the gateway as a patient directory (gRPC client)."""
