"""Benchmarks that measure the running services (see each module for what it measures)."""
