"""Inference's edges: one thin adapter per transport (gRPC Diagnose and KServe v2, KServe REST, CDS Hooks)."""
