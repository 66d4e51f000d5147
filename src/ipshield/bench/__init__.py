"""Benchmarks that compare the protections on real data (digits)."""
