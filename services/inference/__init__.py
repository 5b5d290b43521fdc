"""A hospital's inference service (its public surface for the tools is its core/: nothing of its
edges or adapters is named here)."""
